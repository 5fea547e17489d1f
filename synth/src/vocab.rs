//! The vocabulary subset the generator uses: every concept id it writes, with
//! the row it gets in each site's `concept` table, and the `concept_ancestor`
//! rows that link them.
//!
//! Where a concept comes from is recorded in [`Source`]; the crate doc lists
//! the ids that could not be checked against the bundled vocabularies.

/// Where a concept's id and row were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Row copied from OHDSI Eunomia GiBleed's `CONCEPT.csv`.
    GiBleed,
    /// Row copied from OHDSI EunomiaDatasets Synthea27Nj's `CONCEPT.csv`.
    Synthea,
    /// In both of the above (identical rows).
    Both,
    /// The id appears in GiBleed's `CONCEPT_ANCESTOR.csv` as the ancestor of
    /// concepts whose meaning fits; its name and code are from SNOMED CT.
    Ancestry,
    /// In neither bundled vocabulary: from OMOP conventions and public ETL
    /// code (see the crate doc).
    Unverified,
}

/// One `concept` row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConceptDef {
    pub(crate) id: i64,
    pub(crate) name: &'static str,
    pub(crate) domain: &'static str,
    pub(crate) vocabulary: &'static str,
    pub(crate) class: &'static str,
    pub(crate) standard: bool,
    pub(crate) code: &'static str,
    pub(crate) valid_start: &'static str,
    pub(crate) valid_end: &'static str,
    /// Provenance, kept with the row; read by the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) source: Source,
}

#[allow(clippy::too_many_arguments)]
const fn c(
    id: i64,
    name: &'static str,
    domain: &'static str,
    vocabulary: &'static str,
    class: &'static str,
    standard: bool,
    code: &'static str,
    valid_start: &'static str,
    valid_end: &'static str,
    source: Source,
) -> ConceptDef {
    ConceptDef {
        id,
        name,
        domain,
        vocabulary,
        class,
        standard,
        code,
        valid_start,
        valid_end,
        source,
    }
}

/// Every concept the generator writes anywhere.
pub(crate) const CONCEPTS: &[ConceptDef] = &[
    c(
        0,
        "No matching concept",
        "Metadata",
        "None",
        "Undefined",
        false,
        "No matching concept",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        8507,
        "MALE",
        "Gender",
        "Gender",
        "Gender",
        true,
        "M",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        8532,
        "FEMALE",
        "Gender",
        "Gender",
        "Gender",
        true,
        "F",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        38003564,
        "Not Hispanic or Latino",
        "Ethnicity",
        "Ethnicity",
        "Ethnicity",
        true,
        "Not Hispanic",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        8515,
        "Asian",
        "Race",
        "Race",
        "Race",
        true,
        "2028-9",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        9201,
        "Inpatient Visit",
        "Visit",
        "Visit",
        "Visit",
        true,
        "IP",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        9202,
        "Outpatient Visit",
        "Visit",
        "Visit",
        "Visit",
        true,
        "OP",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        9203,
        "Emergency Room Visit",
        "Visit",
        "Visit",
        "Visit",
        true,
        "ER",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        32817,
        "EHR",
        "Type Concept",
        "Type Concept",
        "Type Concept",
        true,
        "OMOP4976890",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        8717,
        "Inpatient Hospital",
        "Visit",
        "CMS Place of Service",
        "Visit",
        true,
        "21",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        8756,
        "Outpatient Hospital",
        "Visit",
        "CMS Place of Service",
        "Visit",
        true,
        "22",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        8870,
        "Emergency Room - Hospital",
        "Visit",
        "CMS Place of Service",
        "Visit",
        true,
        "23",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        8536,
        "Home",
        "Visit",
        "CMS Place of Service",
        "Visit",
        true,
        "12",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        8940,
        "Office",
        "Visit",
        "CMS Place of Service",
        "Visit",
        true,
        "11",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        44818668,
        "United States dollar",
        "Currency",
        "Currency",
        "Currency",
        true,
        "USD",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        320128,
        "Essential hypertension",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "59621000",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        201826,
        "Type 2 diabetes mellitus",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "44054006",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        255573,
        "Chronic obstructive lung disease",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "13645005",
        "1970-01-01",
        "2099-12-31",
        Source::Ancestry,
    ),
    c(
        261325,
        "Pulmonary emphysema",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "87433001",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        257011,
        "Acute upper respiratory infection",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "54150009",
        "1970-01-01",
        "2099-12-31",
        Source::Ancestry,
    ),
    c(
        4112343,
        "Acute viral pharyngitis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "195662009",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        260139,
        "Acute bronchitis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "10509002",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        255848,
        "Pneumonia",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "233604007",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        317576,
        "Coronary arteriosclerosis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "53741008",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        381316,
        "Cerebrovascular accident",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "230690007",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        192671,
        "Gastrointestinal hemorrhage",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "74474003",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        4329847,
        "Myocardial infarction",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "22298006",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        316139,
        "Heart failure",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "84114007",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        313217,
        "Atrial fibrillation",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "49436004",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        80180,
        "Osteoarthritis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "396275006",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        432867,
        "Hyperlipidemia",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "55822004",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        443597,
        "Chronic kidney disease stage 3",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "433144002",
        "2008-07-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        317009,
        "Asthma",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "195967001",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4132891,
        "Chronic low back pain",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "278860009",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        318800,
        "Gastroesophageal reflux disease",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "235595009",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4027663,
        "Peptic ulcer",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "13200003",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        372328,
        "Otitis media",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "65363002",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        40481087,
        "Viral sinusitis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "444814009",
        "2010-07-31",
        "2099-12-31",
        Source::Both,
    ),
    c(
        195588,
        "Cystitis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "38822007",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4113008,
        "Laceration of hand",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "284549007",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        81151,
        "Sprain of ankle",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "44465007",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        378253,
        "Headache",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "25064002",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        437663,
        "Fever",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "386661006",
        "2003-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4145808,
        "Diarrhea symptom",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "267060006",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4230399,
        "Closed fracture of hip",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "359817006",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4278672,
        "Fracture of forearm",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "65966004",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        440448,
        "Appendicitis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "74400008",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        132797,
        "Sepsis",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "91302008",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        441840,
        "Clinical finding",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "404684003",
        "1970-01-01",
        "2099-12-31",
        Source::Ancestry,
    ),
    c(
        4274025,
        "Disease",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "64572001",
        "1970-01-01",
        "2099-12-31",
        Source::Ancestry,
    ),
    c(
        134057,
        "Disorder of cardiovascular system",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "49601007",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        320136,
        "Disorder of respiratory system",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "50043002",
        "1970-01-01",
        "2099-12-31",
        Source::Ancestry,
    ),
    c(
        201820,
        "Diabetes mellitus",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "73211009",
        "1970-01-01",
        "2099-12-31",
        Source::Ancestry,
    ),
    c(
        316866,
        "Hypertensive disorder",
        "Condition",
        "SNOMED",
        "Clinical Finding",
        true,
        "38341003",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        1332419,
        "Amlodipine 5 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "197361",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1332418,
        "Amlodipine",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "17767",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        40185304,
        "losartan potassium 50 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "979492",
        "2010-06-06",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        19080128,
        "lisinopril 10 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "314076",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        1308216,
        "lisinopril",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "29046",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        19078106,
        "hydrochlorothiazide 25 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "310798",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        40163924,
        "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "Drug",
        "RxNorm",
        "Quant Clinical Drug",
        true,
        "860975",
        "2009-09-06",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        19009384,
        "insulin isophane, human 70 UNT/ML / insulin, regular, human 30 UNT/ML Injectable Suspension [Humulin]",
        "Drug",
        "RxNorm",
        "Branded Drug",
        true,
        "106892",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        19073188,
        "Amoxicillin 500 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "308192",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1713671,
        "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "562251",
        "2005-09-11",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1713332,
        "Amoxicillin",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "723",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        19073777,
        "azithromycin 250 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "308460",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        19075001,
        "Cefuroxime 250 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "309097",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1778162,
        "Cefuroxime",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "2194",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1777806,
        "ceftriaxone",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "2193",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        19078461,
        "Ibuprofen 200 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "310965",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1177480,
        "Ibuprofen",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "5640",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1118084,
        "celecoxib",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "140587",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        40162359,
        "Diclofenac Sodium 75 MG Delayed Release Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "855926",
        "2009-08-02",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        1124300,
        "Diclofenac",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "3355",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        1127433,
        "Acetaminophen 325 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "313782",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1125315,
        "Acetaminophen",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "161",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        19059056,
        "Aspirin 81 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "243670",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1112807,
        "Aspirin",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "1191",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        19075601,
        "clopidogrel 75 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "309362",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1322184,
        "clopidogrel",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "32968",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        1539411,
        "Simvastatin 20 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "312961",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1539403,
        "Simvastatin",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "36567",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        40163554,
        "Warfarin Sodium 5 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "855332",
        "2009-08-02",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1310149,
        "Warfarin",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "11289",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        957136,
        "furosemide 40 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "313988",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        35603224,
        "10 ML furosemide 10 MG/ML Injection",
        "Drug",
        "RxNorm",
        "Quant Clinical Drug",
        true,
        "1719286",
        "2016-05-02",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        1154615,
        "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
        "Drug",
        "RxNorm",
        "Quant Clinical Drug",
        true,
        "745679",
        "2007-12-30",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        1154343,
        "Albuterol",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "435",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        40169281,
        "60 ACTUAT Fluticasone propionate 0.25 MG/ACTUAT / salmeterol 0.05 MG/ACTUAT Dry Powder Inhaler",
        "Drug",
        "RxNorm",
        "Quant Clinical Drug",
        true,
        "896209",
        "2010-01-31",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1149380,
        "fluticasone",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "41126",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        19079524,
        "Sodium Chloride 9 MG/ML Injectable Solution",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "313002",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        967823,
        "Sodium Chloride",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "9863",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        40220960,
        "alteplase 100 MG Injection",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "1804799",
        "2016-10-03",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1347450,
        "alteplase",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "8410",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        40160973,
        "0.4 ML enoxaparin sodium 100 MG/ML Prefilled Syringe",
        "Drug",
        "RxNorm",
        "Quant Clinical Drug",
        true,
        "854235",
        "2009-07-05",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        19126352,
        "Nitroglycerin 0.4 MG/ACTUAT Mucosal Spray",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "705129",
        "2007-05-27",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1361711,
        "Nitroglycerin",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "4917",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        35605858,
        "1 ML Morphine Sulfate 5 MG/ML Injection",
        "Drug",
        "RxNorm",
        "Quant Clinical Drug",
        true,
        "1732136",
        "2016-05-02",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1110410,
        "Morphine",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "7052",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        35605482,
        "2 ML Ondansetron 2 MG/ML Injection",
        "Drug",
        "RxNorm",
        "Quant Clinical Drug",
        true,
        "1740467",
        "2016-05-02",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1000560,
        "Ondansetron",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "26225",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        1551192,
        "Prednisone 5 MG Oral Tablet",
        "Drug",
        "RxNorm",
        "Clinical Drug",
        true,
        "312617",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        1551099,
        "Prednisone",
        "Drug",
        "RxNorm",
        "Ingredient",
        true,
        "8640",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        3004249,
        "Systolic blood pressure",
        "Measurement",
        "LOINC",
        "Clinical Observation",
        true,
        "8480-6",
        "1996-09-06",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        3012888,
        "Diastolic blood pressure",
        "Measurement",
        "LOINC",
        "Clinical Observation",
        true,
        "8462-4",
        "1996-09-06",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        3004410,
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "Measurement",
        "LOINC",
        "Lab Test",
        true,
        "4548-4",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        3004501,
        "Glucose lab",
        "Measurement",
        "LOINC",
        "Lab Test",
        true,
        "2345-7",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        3025315,
        "Body weight",
        "Measurement",
        "LOINC",
        "Clinical Observation",
        true,
        "29463-7",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        3020891,
        "Body temperature",
        "Measurement",
        "LOINC",
        "Clinical Observation",
        true,
        "8310-5",
        "1996-09-06",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        3027018,
        "Heart rate",
        "Measurement",
        "LOINC",
        "Clinical Observation",
        true,
        "8867-4",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        3000963,
        "Hemoglobin",
        "Measurement",
        "LOINC",
        "Lab Test",
        true,
        "718-7",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        3000905,
        "Leukocytes [#/volume] in Blood by Automated count",
        "Measurement",
        "LOINC",
        "Lab Test",
        true,
        "6690-2",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        3016723,
        "Creatinine serum/plasma",
        "Measurement",
        "LOINC",
        "Lab Test",
        true,
        "2160-0",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        3027114,
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "Measurement",
        "LOINC",
        "Lab Test",
        true,
        "2093-3",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        8876,
        "millimeter mercury column",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "mm[Hg]",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        8554,
        "percent",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "%",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        8840,
        "milligram per deciliter",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "mg/dL",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        9529,
        "kilogram",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "kg",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        586323,
        "degree Celsius",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "Cel",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        8541,
        "per minute",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "/min",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        8713,
        "gram per deciliter",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "g/dL",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        8848,
        "thousand per microliter",
        "Unit",
        "UCUM",
        "Unit",
        true,
        "10*3/uL",
        "1970-01-01",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4163951,
        "Electrocardiographic procedure",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "29303009",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4163872,
        "Plain chest X-ray",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "399208008",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4125350,
        "CT of head",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "303653007",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4216130,
        "Percutaneous coronary intervention",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "415070008",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4198190,
        "Appendectomy",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "80146002",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4108705,
        "Intravenous blood transfusion of packed cells",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "180207008",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4125906,
        "Suture open wound",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "288086009",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4293740,
        "Injection of tetanus antitoxin",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "384700001",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4024289,
        "Radiography of ankle",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "19490002",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        4243062,
        "Radiography of wrist",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "60027007",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        4145310,
        "Pelvis X-ray",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "268425006",
        "1970-01-01",
        "2099-12-31",
        Source::GiBleed,
    ),
    c(
        4162736,
        "Oxygen administration by mask",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "371908008",
        "2002-07-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4295880,
        "Intramuscular injection",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "76601001",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
    c(
        4181778,
        "Intravenous injection",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "43060002",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4230911,
        "Echocardiography",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "40701008",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4120120,
        "Hemodialysis",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "302497006",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
    c(
        4202832,
        "Intubation",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "52765003",
        "1970-01-01",
        "2099-12-31",
        Source::Both,
    ),
];

/// Concepts only region mode writes (`SynthOptions::region`), appended to
/// [`CONCEPTS`] in its `concept` tables, so that the default output keeps
/// its vocabulary.
pub(crate) const REGION_CONCEPTS: &[ConceptDef] = &[
    // `discharged_to_concept_id` of a stay that ended in death, as OMOP ETLs
    // (MIMIC-IV's among them) write it; the SNOMED code is from memory.
    c(
        4216643,
        "Patient died",
        "Observation",
        "SNOMED",
        "Clinical Finding",
        true,
        "397709008",
        "1970-01-01",
        "2099-12-31",
        Source::Unverified,
    ),
    c(
        4203771,
        "Total replacement of hip",
        "Procedure",
        "SNOMED",
        "Procedure",
        true,
        "52734007",
        "2002-01-31",
        "2099-12-31",
        Source::Synthea,
    ),
];

/// `concept_ancestor` rows other than the level-0 self links (which every
/// standard concept gets): `(ancestor, descendant, min_levels, max_levels)`.
/// All but the last four are copied from GiBleed's `CONCEPT_ANCESTOR.csv`.
pub(crate) const ANCESTRY: &[(i64, i64, i64, i64)] = &[
    (134057, 313217, 4, 5),
    (134057, 317576, 3, 4),
    (134057, 381316, 3, 3),
    (134057, 4329847, 3, 4),
    (255573, 261325, 1, 1),
    (257011, 4112343, 1, 1),
    (320136, 255848, 4, 5),
    (320136, 260139, 3, 6),
    (320136, 261325, 3, 6),
    (320136, 317009, 1, 1),
    (320136, 4112343, 3, 7),
    (320136, 40481087, 4, 5),
    (441840, 80180, 4, 6),
    (441840, 81151, 6, 11),
    (441840, 192671, 2, 7),
    (441840, 195588, 5, 10),
    (441840, 255848, 6, 9),
    (441840, 260139, 5, 10),
    (441840, 261325, 5, 10),
    (441840, 313217, 7, 12),
    (441840, 317009, 4, 5),
    (441840, 317576, 4, 10),
    (441840, 372328, 5, 8),
    (441840, 381316, 5, 8),
    (441840, 440448, 6, 11),
    (441840, 4027663, 4, 8),
    (441840, 4112343, 5, 11),
    (441840, 4113008, 5, 8),
    (441840, 4230399, 6, 11),
    (441840, 4278672, 6, 10),
    (441840, 4329847, 5, 11),
    (441840, 40481087, 6, 10),
    (967823, 19079524, 2, 3),
    (1000560, 35605482, 2, 3),
    (1110410, 35605858, 2, 3),
    (1112807, 19059056, 2, 3),
    (1125315, 1127433, 2, 3),
    (1149380, 40169281, 2, 3),
    (1154343, 1154615, 2, 3),
    (1177480, 19078461, 2, 3),
    (1310149, 40163554, 2, 3),
    (1322184, 19075601, 2, 3),
    (1332418, 1332419, 2, 3),
    (1347450, 40220960, 2, 3),
    (1361711, 19126352, 2, 3),
    (1539403, 1539411, 2, 3),
    (1551099, 1551192, 2, 3),
    (1713332, 1713671, 2, 3),
    (1713332, 19073188, 2, 3),
    (1778162, 19075001, 2, 3),
    (4274025, 80180, 3, 5),
    (4274025, 81151, 5, 10),
    (4274025, 192671, 6, 6),
    (4274025, 195588, 4, 8),
    (4274025, 255848, 5, 8),
    (4274025, 260139, 4, 9),
    (4274025, 261325, 4, 9),
    (4274025, 313217, 7, 10),
    (4274025, 317009, 4, 4),
    (4274025, 317576, 3, 8),
    (4274025, 372328, 4, 6),
    (4274025, 381316, 4, 7),
    (4274025, 440448, 5, 10),
    (4274025, 4027663, 3, 7),
    (4274025, 4112343, 4, 10),
    (4274025, 4113008, 6, 6),
    (4274025, 4230399, 7, 10),
    (4274025, 4278672, 6, 9),
    (4274025, 4329847, 4, 9),
    (4274025, 40481087, 5, 8),
    // Not in the bundled files: SNOMED and RxNorm parents that are certain,
    // with the levels the verified rows above use for the same kind of link.
    (201820, 201826, 1, 1),
    (316866, 320128, 1, 1),
    (1124300, 40162359, 2, 3),
    (1308216, 19080128, 2, 3),
];

/// The concept row for `id`, if the generator knows it.
#[cfg(test)]
pub(crate) fn concept(id: i64) -> Option<&'static ConceptDef> {
    CONCEPTS.iter().find(|c| c.id == id)
}

/// The concept row for `id` in region mode's vocabulary.
#[cfg(test)]
pub(crate) fn region_concept(id: i64) -> Option<&'static ConceptDef> {
    concept(id).or_else(|| REGION_CONCEPTS.iter().find(|c| c.id == id))
}

// ---- person -------------------------------------------------------------

pub(crate) const MALE: i64 = 8507;
pub(crate) const FEMALE: i64 = 8532;
pub(crate) const RACE_ASIAN: i64 = 8515;
pub(crate) const NO_MATCHING_CONCEPT: i64 = 0;
pub(crate) const NOT_HISPANIC: i64 = 38003564;

// ---- visits, places of service, types ------------------------------------

pub(crate) const INPATIENT_VISIT: i64 = 9201;
pub(crate) const OUTPATIENT_VISIT: i64 = 9202;
pub(crate) const EMERGENCY_VISIT: i64 = 9203;
/// Type Concept "EHR": every `*_type_concept_id`.
pub(crate) const EHR: i64 = 32817;
pub(crate) const POS_INPATIENT_HOSPITAL: i64 = 8717;
pub(crate) const POS_OUTPATIENT_HOSPITAL: i64 = 8756;
pub(crate) const POS_EMERGENCY_ROOM: i64 = 8870;
pub(crate) const POS_HOME: i64 = 8536;
pub(crate) const POS_OFFICE: i64 = 8940;
pub(crate) const USD: i64 = 44818668;
/// "Patient died": `discharged_to_concept_id` of a stay that ended in death
/// (region mode only; see [`REGION_CONCEPTS`]).
pub(crate) const PATIENT_DIED: i64 = 4216643;

// ---- conditions (with ICD-10 source codes as a Chinese EHR records them) -

/// A condition concept and the ICD-10 code written as its source value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cond {
    pub(crate) id: i64,
    pub(crate) icd10: &'static str,
}

pub(crate) const HYPERTENSION: Cond = Cond {
    id: 320128,
    icd10: "I10",
};
pub(crate) const TYPE2_DIABETES: Cond = Cond {
    id: 201826,
    icd10: "E11.9",
};
pub(crate) const COPD: Cond = Cond {
    id: 255573,
    icd10: "J44.9",
};
pub(crate) const EMPHYSEMA: Cond = Cond {
    id: 261325,
    icd10: "J43.9",
};
pub(crate) const ACUTE_URI: Cond = Cond {
    id: 257011,
    icd10: "J06.9",
};
pub(crate) const PHARYNGITIS: Cond = Cond {
    id: 4112343,
    icd10: "J02.9",
};
pub(crate) const BRONCHITIS: Cond = Cond {
    id: 260139,
    icd10: "J20.9",
};
pub(crate) const PNEUMONIA: Cond = Cond {
    id: 255848,
    icd10: "J18.9",
};
pub(crate) const CORONARY_ATHEROSCLEROSIS: Cond = Cond {
    id: 317576,
    icd10: "I25.1",
};
pub(crate) const STROKE: Cond = Cond {
    id: 381316,
    icd10: "I63.9",
};
pub(crate) const GI_HEMORRHAGE: Cond = Cond {
    id: 192671,
    icd10: "K92.2",
};
pub(crate) const MYOCARDIAL_INFARCTION: Cond = Cond {
    id: 4329847,
    icd10: "I21.9",
};
pub(crate) const HEART_FAILURE: Cond = Cond {
    id: 316139,
    icd10: "I50.9",
};
pub(crate) const ATRIAL_FIBRILLATION: Cond = Cond {
    id: 313217,
    icd10: "I48.9",
};
pub(crate) const OSTEOARTHRITIS: Cond = Cond {
    id: 80180,
    icd10: "M19.9",
};
pub(crate) const HYPERLIPIDEMIA: Cond = Cond {
    id: 432867,
    icd10: "E78.5",
};
pub(crate) const CKD_STAGE3: Cond = Cond {
    id: 443597,
    icd10: "N18.3",
};
pub(crate) const ASTHMA: Cond = Cond {
    id: 317009,
    icd10: "J45.9",
};
pub(crate) const LOW_BACK_PAIN: Cond = Cond {
    id: 4132891,
    icd10: "M54.5",
};
pub(crate) const GERD: Cond = Cond {
    id: 318800,
    icd10: "K21.9",
};
pub(crate) const PEPTIC_ULCER: Cond = Cond {
    id: 4027663,
    icd10: "K27.9",
};
pub(crate) const OTITIS_MEDIA: Cond = Cond {
    id: 372328,
    icd10: "H66.9",
};
pub(crate) const SINUSITIS: Cond = Cond {
    id: 40481087,
    icd10: "J01.9",
};
pub(crate) const CYSTITIS: Cond = Cond {
    id: 195588,
    icd10: "N30.9",
};
pub(crate) const LACERATION_HAND: Cond = Cond {
    id: 4113008,
    icd10: "S61.9",
};
pub(crate) const SPRAIN_ANKLE: Cond = Cond {
    id: 81151,
    icd10: "S93.4",
};
pub(crate) const HEADACHE: Cond = Cond {
    id: 378253,
    icd10: "R51",
};
pub(crate) const FEVER: Cond = Cond {
    id: 437663,
    icd10: "R50.9",
};
pub(crate) const DIARRHEA: Cond = Cond {
    id: 4145808,
    icd10: "R19.7",
};
pub(crate) const HIP_FRACTURE: Cond = Cond {
    id: 4230399,
    icd10: "S72.0",
};
pub(crate) const FOREARM_FRACTURE: Cond = Cond {
    id: 4278672,
    icd10: "S52.9",
};
pub(crate) const APPENDICITIS: Cond = Cond {
    id: 440448,
    icd10: "K35.8",
};
pub(crate) const SEPSIS: Cond = Cond {
    id: 132797,
    icd10: "A41.9",
};

/// Every condition the generator records (the public domain of
/// `condition_concept_id` and `cause_concept_id`).
pub(crate) const CONDITIONS: &[Cond] = &[
    HYPERTENSION,
    TYPE2_DIABETES,
    COPD,
    EMPHYSEMA,
    ACUTE_URI,
    PHARYNGITIS,
    BRONCHITIS,
    PNEUMONIA,
    CORONARY_ATHEROSCLEROSIS,
    STROKE,
    GI_HEMORRHAGE,
    MYOCARDIAL_INFARCTION,
    HEART_FAILURE,
    ATRIAL_FIBRILLATION,
    OSTEOARTHRITIS,
    HYPERLIPIDEMIA,
    CKD_STAGE3,
    ASTHMA,
    LOW_BACK_PAIN,
    GERD,
    PEPTIC_ULCER,
    OTITIS_MEDIA,
    SINUSITIS,
    CYSTITIS,
    LACERATION_HAND,
    SPRAIN_ANKLE,
    HEADACHE,
    FEVER,
    DIARRHEA,
    HIP_FRACTURE,
    FOREARM_FRACTURE,
    APPENDICITIS,
    SEPSIS,
];

// ---- drugs ----------------------------------------------------------------

/// A drug concept with how it is dispensed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Drug {
    pub(crate) id: i64,
    /// Written as `drug_source_value`.
    pub(crate) source: &'static str,
    /// Written as `route_source_value`.
    pub(crate) route: &'static str,
    /// Units (tablets, vials, inhalers) per day of supply.
    pub(crate) per_day: f64,
    /// Price per unit in USD, for the visit's charge.
    pub(crate) unit_price: f64,
}

const fn d(
    id: i64,
    source: &'static str,
    route: &'static str,
    per_day: f64,
    unit_price: f64,
) -> Drug {
    Drug {
        id,
        source,
        route,
        per_day,
        unit_price,
    }
}

pub(crate) const AMLODIPINE: Drug = d(1332419, "amlodipine 5 mg tablet", "oral", 1.0, 0.05);
pub(crate) const LOSARTAN: Drug = d(40185304, "losartan 50 mg tablet", "oral", 1.0, 0.08);
pub(crate) const LISINOPRIL: Drug = d(19080128, "lisinopril 10 mg tablet", "oral", 1.0, 0.06);
pub(crate) const HCTZ: Drug = d(
    19078106,
    "hydrochlorothiazide 25 mg tablet",
    "oral",
    1.0,
    0.02,
);
pub(crate) const METFORMIN: Drug = d(40163924, "metformin ER 500 mg tablet", "oral", 2.0, 0.04);
pub(crate) const INSULIN: Drug = d(
    19009384,
    "insulin 70/30 (Humulin) 10 ml vial",
    "subcutaneous",
    0.1,
    9.0,
);
pub(crate) const AMOXICILLIN: Drug = d(19073188, "amoxicillin 500 mg tablet", "oral", 3.0, 0.05);
pub(crate) const AMOX_CLAV: Drug = d(
    1713671,
    "amoxicillin/clavulanate 250/125 mg tablet",
    "oral",
    3.0,
    0.15,
);
pub(crate) const AZITHROMYCIN: Drug = d(19073777, "azithromycin 250 mg tablet", "oral", 1.0, 0.25);
pub(crate) const CEFUROXIME: Drug = d(19075001, "cefuroxime 250 mg tablet", "oral", 2.0, 0.2);
pub(crate) const CEFTRIAXONE: Drug = d(
    1777806,
    "ceftriaxone 1 g injection",
    "intravenous",
    1.0,
    1.5,
);
pub(crate) const IBUPROFEN: Drug = d(19078461, "ibuprofen 200 mg tablet", "oral", 3.0, 0.03);
pub(crate) const CELECOXIB: Drug = d(1118084, "celecoxib 200 mg capsule", "oral", 1.0, 0.4);
pub(crate) const DICLOFENAC: Drug = d(
    40162359,
    "diclofenac sodium 75 mg DR tablet",
    "oral",
    2.0,
    0.05,
);
pub(crate) const ACETAMINOPHEN: Drug = d(1127433, "acetaminophen 325 mg tablet", "oral", 3.0, 0.02);
pub(crate) const ASPIRIN: Drug = d(19059056, "aspirin 81 mg tablet", "oral", 1.0, 0.02);
pub(crate) const CLOPIDOGREL: Drug = d(19075601, "clopidogrel 75 mg tablet", "oral", 1.0, 0.3);
pub(crate) const SIMVASTATIN: Drug = d(1539411, "simvastatin 20 mg tablet", "oral", 1.0, 0.06);
pub(crate) const WARFARIN: Drug = d(40163554, "warfarin 5 mg tablet", "oral", 1.0, 0.05);
pub(crate) const FUROSEMIDE: Drug = d(957136, "furosemide 40 mg tablet", "oral", 1.0, 0.02);
pub(crate) const FUROSEMIDE_IV: Drug = d(
    35603224,
    "furosemide 100 mg/10 ml injection",
    "intravenous",
    1.0,
    1.0,
);
pub(crate) const ALBUTEROL: Drug = d(1154615, "albuterol 90 mcg inhaler", "inhalation", 0.03, 4.0);
pub(crate) const FLUTICASONE_SALMETEROL: Drug = d(
    40169281,
    "fluticasone/salmeterol 250/50 inhaler",
    "inhalation",
    0.033,
    25.0,
);
pub(crate) const SALINE: Drug = d(
    19079524,
    "sodium chloride 0.9% 500 ml",
    "intravenous",
    2.0,
    0.8,
);
pub(crate) const ALTEPLASE: Drug = d(
    40220960,
    "alteplase 100 mg injection",
    "intravenous",
    1.0,
    900.0,
);
pub(crate) const ENOXAPARIN: Drug = d(
    40160973,
    "enoxaparin 40 mg/0.4 ml syringe",
    "subcutaneous",
    2.0,
    3.0,
);
pub(crate) const NITROGLYCERIN: Drug = d(
    19126352,
    "nitroglycerin 0.4 mg spray",
    "sublingual",
    1.0,
    6.0,
);
pub(crate) const MORPHINE: Drug = d(
    35605858,
    "morphine 5 mg/ml injection",
    "intravenous",
    2.0,
    1.0,
);
pub(crate) const ONDANSETRON: Drug = d(
    35605482,
    "ondansetron 4 mg/2 ml injection",
    "intravenous",
    2.0,
    1.0,
);
pub(crate) const PREDNISONE: Drug = d(1551192, "prednisone 5 mg tablet", "oral", 6.0, 0.02);

/// Every drug the generator dispenses.
pub(crate) const DRUGS: &[Drug] = &[
    AMLODIPINE,
    LOSARTAN,
    LISINOPRIL,
    HCTZ,
    METFORMIN,
    INSULIN,
    AMOXICILLIN,
    AMOX_CLAV,
    AZITHROMYCIN,
    CEFUROXIME,
    CEFTRIAXONE,
    IBUPROFEN,
    CELECOXIB,
    DICLOFENAC,
    ACETAMINOPHEN,
    ASPIRIN,
    CLOPIDOGREL,
    SIMVASTATIN,
    WARFARIN,
    FUROSEMIDE,
    FUROSEMIDE_IV,
    ALBUTEROL,
    FLUTICASONE_SALMETEROL,
    SALINE,
    ALTEPLASE,
    ENOXAPARIN,
    NITROGLYCERIN,
    MORPHINE,
    ONDANSETRON,
    PREDNISONE,
];

// ---- measurements -----------------------------------------------------------

/// A measurement concept with its unit and reference range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Meas {
    pub(crate) id: i64,
    /// LOINC code, written as `measurement_source_value`.
    pub(crate) loinc: &'static str,
    pub(crate) unit: i64,
    pub(crate) unit_source: &'static str,
    pub(crate) range: (f64, f64),
    /// Values are clamped to this and rounded to `decimals`.
    pub(crate) limits: (f64, f64),
    pub(crate) decimals: i32,
}

const fn m(
    id: i64,
    loinc: &'static str,
    unit: i64,
    unit_source: &'static str,
    range: (f64, f64),
    limits: (f64, f64),
    decimals: i32,
) -> Meas {
    Meas {
        id,
        loinc,
        unit,
        unit_source,
        range,
        limits,
        decimals,
    }
}

pub(crate) const SYSTOLIC_BP: Meas = m(
    3004249,
    "8480-6",
    8876,
    "mm[Hg]",
    (90.0, 139.0),
    (70.0, 240.0),
    0,
);
pub(crate) const DIASTOLIC_BP: Meas = m(
    3012888,
    "8462-4",
    8876,
    "mm[Hg]",
    (60.0, 89.0),
    (40.0, 140.0),
    0,
);
pub(crate) const HBA1C: Meas = m(3004410, "4548-4", 8554, "%", (4.0, 6.0), (4.0, 16.0), 1);
pub(crate) const GLUCOSE: Meas = m(
    3004501,
    "2345-7",
    8840,
    "mg/dL",
    (70.0, 99.0),
    (40.0, 500.0),
    0,
);
pub(crate) const BODY_WEIGHT: Meas = m(3025315, "29463-7", 9529, "kg", (0.0, 0.0), (2.0, 150.0), 1);
pub(crate) const BODY_TEMPERATURE: Meas = m(
    3020891,
    "8310-5",
    586323,
    "Cel",
    (36.1, 37.2),
    (34.5, 42.0),
    1,
);
pub(crate) const HEART_RATE: Meas = m(
    3027018,
    "8867-4",
    8541,
    "/min",
    (60.0, 100.0),
    (30.0, 200.0),
    0,
);
pub(crate) const HEMOGLOBIN: Meas = m(3000963, "718-7", 8713, "g/dL", (12.0, 17.5), (3.0, 20.0), 1);
pub(crate) const LEUKOCYTES: Meas = m(
    3000905,
    "6690-2",
    8848,
    "10*3/uL",
    (4.0, 10.0),
    (0.5, 60.0),
    1,
);
pub(crate) const CREATININE: Meas = m(3016723, "2160-0", 8840, "mg/dL", (0.6, 1.2), (0.2, 15.0), 2);
pub(crate) const CHOLESTEROL: Meas = m(
    3027114,
    "2093-3",
    8840,
    "mg/dL",
    (0.0, 200.0),
    (80.0, 450.0),
    0,
);

/// Every measurement the generator records.
pub(crate) const MEASUREMENTS: &[Meas] = &[
    SYSTOLIC_BP,
    DIASTOLIC_BP,
    HBA1C,
    GLUCOSE,
    BODY_WEIGHT,
    BODY_TEMPERATURE,
    HEART_RATE,
    HEMOGLOBIN,
    LEUKOCYTES,
    CREATININE,
    CHOLESTEROL,
];

/// The unit concepts measurements use.
pub(crate) const UNITS: &[i64] = &[8876, 8554, 8840, 9529, 586323, 8541, 8713, 8848];

// ---- procedures -------------------------------------------------------------

/// A procedure concept and its price in USD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Proc {
    pub(crate) id: i64,
    pub(crate) source: &'static str,
    pub(crate) price: f64,
}

const fn p(id: i64, source: &'static str, price: f64) -> Proc {
    Proc { id, source, price }
}

pub(crate) const ECG: Proc = p(4163951, "ECG", 6.0);
pub(crate) const CHEST_XRAY: Proc = p(4163872, "chest X-ray", 12.0);
pub(crate) const CT_HEAD: Proc = p(4125350, "CT head", 45.0);
pub(crate) const PCI: Proc = p(4216130, "PCI", 5200.0);
pub(crate) const APPENDECTOMY: Proc = p(4198190, "appendectomy", 650.0);
pub(crate) const TRANSFUSION: Proc = p(4108705, "packed cell transfusion", 120.0);
pub(crate) const SUTURE: Proc = p(4125906, "wound suture", 8.0);
pub(crate) const TETANUS: Proc = p(4293740, "tetanus antitoxin", 5.0);
pub(crate) const XRAY_ANKLE: Proc = p(4024289, "ankle X-ray", 10.0);
pub(crate) const XRAY_WRIST: Proc = p(4243062, "wrist X-ray", 10.0);
pub(crate) const XRAY_PELVIS: Proc = p(4145310, "pelvis X-ray", 14.0);
pub(crate) const OXYGEN_MASK: Proc = p(4162736, "oxygen by mask", 4.0);
pub(crate) const IM_INJECTION: Proc = p(4295880, "intramuscular injection", 1.0);
pub(crate) const IV_INJECTION: Proc = p(4181778, "intravenous infusion", 2.0);
pub(crate) const ECHOCARDIOGRAPHY: Proc = p(4230911, "echocardiography", 35.0);
pub(crate) const HEMODIALYSIS: Proc = p(4120120, "hemodialysis", 60.0);
pub(crate) const INTUBATION: Proc = p(4202832, "intubation", 40.0);
/// Hip replacement for a hip fracture (region mode only).
pub(crate) const HIP_REPLACEMENT: Proc = p(4203771, "hip replacement", 2800.0);

/// Every procedure the generator records.
pub(crate) const PROCEDURES: &[Proc] = &[
    ECG,
    CHEST_XRAY,
    CT_HEAD,
    PCI,
    APPENDECTOMY,
    TRANSFUSION,
    SUTURE,
    TETANUS,
    XRAY_ANKLE,
    XRAY_WRIST,
    XRAY_PELVIS,
    OXYGEN_MASK,
    IM_INJECTION,
    IV_INJECTION,
    ECHOCARDIOGRAPHY,
    HEMODIALYSIS,
    INTUBATION,
];

/// Procedures only region mode performs.
pub(crate) const REGION_PROCEDURES: &[Proc] = &[HIP_REPLACEMENT];

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_id_used_has_a_concept_row() {
        let ids = CONDITIONS
            .iter()
            .map(|c| c.id)
            .chain(DRUGS.iter().map(|d| d.id))
            .chain(MEASUREMENTS.iter().map(|m| m.id))
            .chain(MEASUREMENTS.iter().map(|m| m.unit))
            .chain(UNITS.iter().copied())
            .chain(PROCEDURES.iter().map(|p| p.id))
            .chain(ANCESTRY.iter().flat_map(|a| [a.0, a.1]))
            .chain([
                MALE,
                FEMALE,
                RACE_ASIAN,
                NO_MATCHING_CONCEPT,
                NOT_HISPANIC,
                INPATIENT_VISIT,
                OUTPATIENT_VISIT,
                EMERGENCY_VISIT,
                EHR,
                POS_INPATIENT_HOSPITAL,
                POS_OUTPATIENT_HOSPITAL,
                POS_EMERGENCY_ROOM,
                POS_HOME,
                POS_OFFICE,
                USD,
            ]);
        for id in ids {
            assert!(concept(id).is_some(), "concept {id} has no row");
        }
        let unique: HashSet<i64> = CONCEPTS.iter().map(|c| c.id).collect();
        assert_eq!(unique.len(), CONCEPTS.len(), "a concept is listed twice");
    }

    #[test]
    fn unverified_concepts_are_the_documented_ones() {
        let mut unverified: Vec<i64> = CONCEPTS
            .iter()
            .filter(|c| c.source == Source::Unverified)
            .map(|c| c.id)
            .collect();
        unverified.sort_unstable();
        assert_eq!(
            unverified,
            [8515, 8536, 8717, 8756, 8870, 8940, 32817, 316866, 44818668]
        );
        let mut ancestry: Vec<i64> = CONCEPTS
            .iter()
            .filter(|c| c.source == Source::Ancestry)
            .map(|c| c.id)
            .collect();
        ancestry.sort_unstable();
        assert_eq!(ancestry, [201820, 255573, 257011, 320136, 441840, 4274025]);
        for c in CONCEPTS {
            assert_eq!(c.standard, c.id != 0, "{}", c.name);
            assert_eq!(
                c.standard,
                c.domain != "Metadata",
                "{} has domain {}",
                c.name,
                c.domain
            );
        }
        assert_eq!(concept(192671).map(|c| c.source), Some(Source::GiBleed));
    }

    #[test]
    fn region_concepts_are_new_and_known() {
        for c in REGION_CONCEPTS {
            assert!(concept(c.id).is_none(), "{} is already in CONCEPTS", c.id);
            assert!(c.standard);
        }
        for id in REGION_PROCEDURES
            .iter()
            .map(|p| p.id)
            .chain([PATIENT_DIED, POS_OFFICE])
        {
            assert!(region_concept(id).is_some(), "concept {id} has no row");
        }
        let unverified: Vec<i64> = REGION_CONCEPTS
            .iter()
            .filter(|c| c.source == Source::Unverified)
            .map(|c| c.id)
            .collect();
        assert_eq!(unverified, [PATIENT_DIED]);
    }
}
