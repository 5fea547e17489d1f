use std::collections::{HashMap, HashSet};

use confer_synth::Tier;

use crate::common::*;

const HYPERTENSION: i64 = 320128;
const TYPE2_DIABETES: i64 = 201826;
const HBA1C: i64 = 3004410;
const SYSTOLIC: i64 = 3004249;
const METFORMIN: i64 = 40163924;
const INSULIN: i64 = 19009384;
const ANTIHYPERTENSIVES: [i64; 4] = [1332419, 40185304, 19080128, 19078106];
/// Stroke, MI, GI haemorrhage, pneumonia, hip fracture, sepsis.
const SEVERE: [i64; 6] = [381316, 4329847, 192671, 255848, 4230399, 132797];
const RESPIRATORY: [i64; 5] = [257011, 4112343, 260139, 40481087, 372328];

#[test]
fn residents_are_the_same_people_at_every_site() {
    let mut seen: HashMap<i64, (i64, i64, i64, Option<i64>)> = HashMap::new();
    let mut sites_of: HashMap<i64, usize> = HashMap::new();
    for (site, b) in all("person") {
        let yob = ints_req(&b, "year_of_birth");
        let sex = ints_req(&b, "gender_concept_id");
        let race = ints_req(&b, "race_concept_id");
        let birth = timestamps(&b, "birth_datetime");
        for (i, p) in ints_req(&b, "person_id").into_iter().enumerate() {
            let me = (yob[i], sex[i], race[i], birth[i]);
            if let Some(before) = seen.insert(p, me) {
                assert_eq!(before, me, "{site}: person {p} differs from another site");
            }
            *sites_of.entry(p).or_default() += 1;
        }
    }
    let several = sites_of.values().filter(|&&n| n >= 2).count();
    assert!(
        several * 5 > sites_of.len(),
        "only {several} of {} residents use two or more sites",
        sites_of.len()
    );
    assert!(
        sites_of.len() > 1000,
        "{} residents used care",
        sites_of.len()
    );
}

/// (outpatient, inpatient, emergency) shares of a site's visits.
fn visit_mix(site: &str) -> (f64, f64, f64) {
    let v = ints_req(
        &read(&network().site_dir(site), "visit_occurrence"),
        "visit_concept_id",
    );
    let share = |c| v.iter().filter(|&&x| x == c).count() as f64 / v.len() as f64;
    (share(9202), share(9201), share(9203))
}

/// Mean age of the patients at a site's visits of one type (all types: `None`).
fn visit_age(site: &str, concept: Option<i64>) -> f64 {
    let dir = network().site_dir(site);
    let persons = read(&dir, "person");
    let yob: HashMap<i64, i64> = ints_req(&persons, "person_id")
        .into_iter()
        .zip(ints_req(&persons, "year_of_birth"))
        .collect();
    let v = read(&dir, "visit_occurrence");
    let types = ints_req(&v, "visit_concept_id");
    let starts = dates(&v, "visit_start_date");
    let ages: Vec<f64> = ints_req(&v, "person_id")
        .into_iter()
        .enumerate()
        .filter(|(i, _)| concept.is_none_or(|c| types[*i] == c))
        .map(|(i, p)| f64::from(starts[i].unwrap()) / 365.25 + 1970.0 - yob[&p] as f64)
        .collect();
    ages.iter().sum::<f64>() / ages.len() as f64
}

/// Mean charge per visit.
fn charge(site: &str) -> f64 {
    let c = floats(&read(&network().site_dir(site), "cost"), "total_charge");
    c.iter().flatten().sum::<f64>() / c.len() as f64
}

#[test]
fn tiers_see_different_patients_and_visits() {
    let net = network();
    let village = net
        .sites_of(Tier::Village)
        .next()
        .expect("a village")
        .name
        .clone();
    let (v_op, v_ip, v_er) = visit_mix(&village);
    let (t_op, t_ip, t_er) = visit_mix("tertiary-1");
    let (w_op, w_ip, w_er) = visit_mix("township-1");
    let (c_op, _, c_er) = visit_mix("county-1");
    assert!(
        v_op > 0.99 && v_ip == 0.0 && v_er == 0.0,
        "village mix {v_op} {v_ip} {v_er}"
    );
    assert!(
        w_op > 0.97 && w_er == 0.0,
        "township mix {w_op} {w_ip} {w_er}"
    );
    assert!(
        t_ip > 0.04 && t_er > 0.02 && t_op < 0.93,
        "tertiary mix {t_op} {t_ip} {t_er}"
    );
    assert!(
        t_ip > 4.0 * w_ip,
        "inpatient share: tertiary {t_ip}, township {w_ip}"
    );
    assert!(c_op < v_op && c_er > 0.01, "county mix {c_op} {c_er}");
    // Tertiary inpatients are old; village clinics see children and elders.
    let (t_age, v_age) = (
        visit_age("tertiary-1", Some(9201)),
        visit_age(&village, None),
    );
    assert!(
        t_age > v_age + 10.0,
        "tertiary inpatients {t_age}, village patients {v_age}"
    );
    let (t_charge, c_charge, v_charge) =
        (charge("tertiary-1"), charge("county-1"), charge(&village));
    assert!(
        t_charge > 2.0 * c_charge && c_charge > 3.0 * v_charge,
        "charges {t_charge} {c_charge} {v_charge}"
    );
    // Case mix: the tertiary hospital sees severe acute disease.
    let share = |site: &str, set: &[i64]| {
        let c = ints_req(
            &read(&net.site_dir(site), "condition_occurrence"),
            "condition_concept_id",
        );
        c.iter().filter(|x| set.contains(x)).count() as f64 / c.len() as f64
    };
    let (t_acute, w_acute) = (share("tertiary-1", &SEVERE), share("township-1", &SEVERE));
    assert!(
        t_acute > 3.0 * w_acute,
        "severe acute share: tertiary {t_acute}, township {w_acute}"
    );
}

#[test]
fn respiratory_infections_peak_in_winter() {
    let (mut winter, mut summer) = (0, 0);
    for (_, b) in all("condition_occurrence") {
        let c = ints_req(&b, "condition_concept_id");
        let d = dates(&b, "condition_start_date");
        for i in 0..b.num_rows() {
            if !RESPIRATORY.contains(&c[i]) {
                continue;
            }
            // Month from the day number (days since 1970-01-01).
            let month = month_of(d[i].unwrap());
            match month {
                12 | 1 | 2 => winter += 1,
                6..=8 => summer += 1,
                _ => {}
            }
        }
    }
    assert!(
        winter as f64 > 1.8 * summer as f64,
        "winter {winter}, summer {summer}"
    );
}

fn month_of(day: i32) -> u32 {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = (z - era * 146_097) as u32;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    if mp < 10 { mp + 3 } else { mp - 9 }
}

#[test]
fn chronic_disease_is_treated_and_measured() {
    let mut diagnosed: HashMap<i64, HashSet<i64>> = HashMap::new();
    for (_, b) in all("condition_occurrence") {
        for (p, c) in ints_req(&b, "person_id")
            .into_iter()
            .zip(ints_req(&b, "condition_concept_id"))
        {
            diagnosed.entry(c).or_default().insert(p);
        }
    }
    let mut drugs: HashMap<i64, HashSet<i64>> = HashMap::new();
    for (_, b) in all("drug_exposure") {
        for (p, d) in ints_req(&b, "person_id")
            .into_iter()
            .zip(ints_req(&b, "drug_concept_id"))
        {
            drugs.entry(p).or_default().insert(d);
        }
    }
    let diabetics = &diagnosed[&TYPE2_DIABETES];
    let treated = diabetics
        .iter()
        .filter(|p| {
            drugs
                .get(p)
                .is_some_and(|d| d.contains(&METFORMIN) || d.contains(&INSULIN))
        })
        .count();
    assert!(
        treated * 2 > diabetics.len(),
        "{treated} of {} diabetics treated",
        diabetics.len()
    );
    let hypertensives = &diagnosed[&HYPERTENSION];
    let treated = hypertensives
        .iter()
        .filter(|p| {
            drugs
                .get(p)
                .is_some_and(|d| ANTIHYPERTENSIVES.iter().any(|a| d.contains(a)))
        })
        .count();
    assert!(treated * 2 > hypertensives.len());

    let (mut a1c_dm, mut a1c_n) = (0.0, 0);
    let (mut sbp_htn, mut n_htn, mut sbp_other, mut n_other) = (0.0, 0, 0.0, 0);
    for (_, b) in all("measurement") {
        let p = ints_req(&b, "person_id");
        let c = ints_req(&b, "measurement_concept_id");
        let v = floats(&b, "value_as_number");
        let u = ints(&b, "unit_concept_id");
        for i in 0..b.num_rows() {
            let value = v[i].expect("a value");
            if c[i] == HBA1C {
                assert_eq!(u[i], Some(8554));
                assert!(diabetics.contains(&p[i]), "HbA1c for a non-diabetic");
                a1c_dm += value;
                a1c_n += 1;
            }
            if c[i] == SYSTOLIC {
                assert_eq!(u[i], Some(8876));
                assert!((70.0..=240.0).contains(&value));
                if hypertensives.contains(&p[i]) {
                    sbp_htn += value;
                    n_htn += 1;
                } else {
                    sbp_other += value;
                    n_other += 1;
                }
            }
        }
    }
    assert!(a1c_n > 20);
    let a1c = a1c_dm / f64::from(a1c_n);
    assert!((6.5..9.0).contains(&a1c), "mean HbA1c of diabetics {a1c}");
    let (htn, other) = (sbp_htn / f64::from(n_htn), sbp_other / f64::from(n_other));
    assert!(
        htn > other + 8.0,
        "systolic: hypertensive {htn}, others {other}"
    );
}

#[test]
fn hypertension_rises_with_age() {
    let mut yob: HashMap<i64, i64> = HashMap::new();
    for (_, b) in all("person") {
        for (p, y) in ints_req(&b, "person_id")
            .into_iter()
            .zip(ints_req(&b, "year_of_birth"))
        {
            yob.insert(p, y);
        }
    }
    let mut htn = HashSet::new();
    for (_, b) in all("condition_occurrence") {
        for (p, c) in ints_req(&b, "person_id")
            .into_iter()
            .zip(ints_req(&b, "condition_concept_id"))
        {
            if c == HYPERTENSION {
                htn.insert(p);
            }
        }
    }
    let share = |lo: i64, hi: i64| {
        let group: Vec<i64> = yob
            .iter()
            .filter(|(_, y)| (lo..hi).contains(&(2024 - **y)))
            .map(|(p, _)| *p)
            .collect();
        group.iter().filter(|p| htn.contains(p)).count() as f64 / group.len().max(1) as f64
    };
    let (young, middle, old) = (share(18, 45), share(45, 65), share(65, 101));
    assert!(
        young < middle && middle < old,
        "hypertension by age: {young} {middle} {old}"
    );
}
