//! The clinical model: one resident's six years of care across the network,
//! turned into OMOP rows at every site they visited.
//!
//! Everything a resident does is drawn from a ChaCha8 generator seeded from
//! (seed, person_id) alone, so a resident's rows do not depend on how the
//! population is split into chunks or threads.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dates::{
    DAY_US, HOUR_US, MINUTE_US, civil_from_days, day_of, days_from_civil, year_fraction,
};
use crate::network::{Home, HomeKind, Network, Tier, mix};
use crate::schema::{
    ConditionOccurrence, Cost, Death, DrugExposure, Measurement, ObservationPeriod, Person,
    ProcedureOccurrence, Text, VisitOccurrence,
};
use crate::vocab::{self, Cond, Drug, Meas, Proc};

/// Row ids are `person_id * ID_STRIDE + n`, `n` counting the person's rows
/// across every table and site, so ids are unique across the network.
pub(crate) const ID_STRIDE: i64 = 1_000_000;
/// Upper limit of any charge (the node.toml bound).
pub(crate) const MAX_CHARGE: f64 = 100_000.0;
/// Oldest age the model produces at the window's end, in years.
pub(crate) const MAX_AGE: i64 = 100;

/// What the model simulates besides the network: the window, whether the
/// region-mode additions are on, and where each site's rows go.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// First day of the window (day number).
    pub(crate) start: i32,
    /// Last day of the window.
    pub(crate) end: i32,
    /// Region mode: in-hospital deaths, downward referrals, readmissions,
    /// drug costs, registered hypertension and diabetes follow-up, hip
    /// surgery. Off, the model draws exactly what it always did.
    pub(crate) region: bool,
    /// The output (node directory) each site's rows go to, by site index.
    pub(crate) dest: Vec<usize>,
}

impl Settings {
    /// One output per site, no region additions, the window `start..=end`.
    #[cfg(test)]
    pub(crate) fn per_site(net: &Network, start: i32, end: i32) -> Self {
        Self {
            start,
            end,
            region: false,
            dest: (0..net.len()).collect(),
        }
    }
}

/// Where rows go: one sink per site, filled in person order.
pub(crate) trait Sink {
    fn person(&mut self, site: usize, row: Person);
    fn observation_period(&mut self, site: usize, row: ObservationPeriod);
    fn visit(&mut self, site: usize, row: VisitOccurrence);
    fn condition(&mut self, site: usize, row: ConditionOccurrence);
    fn drug(&mut self, site: usize, row: DrugExposure);
    fn procedure(&mut self, site: usize, row: ProcedureOccurrence);
    fn measurement(&mut self, site: usize, row: Measurement);
    fn death(&mut self, site: usize, row: Death);
    fn cost(&mut self, site: usize, row: Cost);
}

// ---- small sampling helpers -------------------------------------------------

fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    rng.random::<f64>() < p
}

fn normal(rng: &mut ChaCha8Rng, mean: f64, sd: f64) -> f64 {
    // Box-Muller; one of the pair is enough here.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Days until the next event of a Poisson process with `per_year` events a year.
fn gap_days(rng: &mut ChaCha8Rng, per_year: f64) -> i32 {
    let u = 1.0 - rng.random::<f64>();
    let days = -u.ln() / per_year * 365.25;
    (days.min(1.0e6).ceil() as i32).max(1)
}

/// Days to the next follow-up at `per_year` visits a year: revisits are
/// booked, so gaps are spread around the mean (0.4 to 1.6 times it) rather
/// than exponential.
fn revisit_days(rng: &mut ChaCha8Rng, per_year: f64) -> i32 {
    let mean = 365.25 / per_year;
    ((mean * (0.4 + 1.2 * rng.random::<f64>())).round() as i32).max(7)
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, options: &[(T, f64)]) -> T {
    let total: f64 = options.iter().map(|o| o.1).sum();
    let mut x = rng.random::<f64>() * total;
    for &(v, w) in options {
        if x < w {
            return v;
        }
        x -= w;
    }
    options[options.len() - 1].0
}

fn logistic(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// Region mode: drug prices relative to the base prices, by tier, chosen so
/// that drugs are about a quarter of charges at the tertiary hospital (its
/// pricier formulary against far larger fees for beds and procedures), a
/// third at county hospitals and nearly half at township centres and
/// village clinics, which live on drugs.
fn drug_markup(tier: Tier) -> f64 {
    match tier {
        Tier::Tertiary => 13.5,
        Tier::County => 6.8,
        Tier::Township => 4.7,
        Tier::Village => 2.55,
    }
}

/// Respiratory season: 1.8 in mid-January, 0.2 in mid-July.
fn respiratory_season(day: i32) -> f64 {
    1.0 + 0.8 * (std::f64::consts::TAU * (year_fraction(day) - 0.04)).cos()
}

// ---- the resident -----------------------------------------------------------

/// Long-term conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Chronic {
    Hypertension,
    Diabetes,
    Copd,
    Cad,
    AtrialFibrillation,
    HeartFailure,
    Osteoarthritis,
    Hyperlipidemia,
    Ckd,
    Asthma,
    LowBackPain,
    Gerd,
    /// After a stroke: secondary prevention.
    PostStroke,
}

impl Chronic {
    fn cond(self) -> Cond {
        match self {
            Chronic::Hypertension => vocab::HYPERTENSION,
            Chronic::Diabetes => vocab::TYPE2_DIABETES,
            Chronic::Copd => vocab::COPD,
            Chronic::Cad => vocab::CORONARY_ATHEROSCLEROSIS,
            Chronic::AtrialFibrillation => vocab::ATRIAL_FIBRILLATION,
            Chronic::HeartFailure => vocab::HEART_FAILURE,
            Chronic::Osteoarthritis => vocab::OSTEOARTHRITIS,
            Chronic::Hyperlipidemia => vocab::HYPERLIPIDEMIA,
            Chronic::Ckd => vocab::CKD_STAGE3,
            Chronic::Asthma => vocab::ASTHMA,
            Chronic::LowBackPain => vocab::LOW_BACK_PAIN,
            Chronic::Gerd => vocab::GERD,
            Chronic::PostStroke => vocab::STROKE,
        }
    }

    /// Whether the condition brings regular follow-up visits once diagnosed.
    fn followed_up(self) -> bool {
        !matches!(
            self,
            Chronic::Osteoarthritis | Chronic::LowBackPain | Chronic::Gerd
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct ChronicState {
    kind: Chronic,
    onset: i32,
    /// Known to the health system (and treated) from this day on.
    diagnosed: Option<i32>,
}

/// Acute events that send a resident to hospital.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Severe {
    Stroke,
    MyocardialInfarction,
    GiBleed,
    HeartFailureExacerbation,
    CopdExacerbation,
    HipFracture,
    ForearmFracture,
    Appendicitis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Trigger {
    FollowUp,
    Diagnose(usize),
    Minor,
    Severe(Severe),
    /// Pneumonia after a respiratory infection; the index of the visit that
    /// referred it (if it was seen).
    Pneumonia(Option<usize>),
    /// Region mode: the follow-up at the local clinic after a downward
    /// referral from the hospital stay ending with this visit.
    StepDown(usize),
    /// Region mode: readmission to the hospital of the stay ending with this
    /// visit.
    Readmit(usize),
}

#[derive(Debug, Clone)]
struct VisitRec {
    id: i64,
    site: usize,
    concept: i64,
    start: i64,
    end: i64,
    provider: i64,
    preceding: Option<i64>,
    admitted_from: Option<i64>,
    discharged_to: Option<i64>,
    charge: f64,
    /// The part of `charge` that is drugs (region mode's
    /// `paid_ingredient_cost`).
    drug_cost: f64,
}

#[derive(Debug, Clone, Copy)]
struct CondRec {
    visit: usize,
    cond: Cond,
    end: Option<i32>,
}

#[derive(Debug, Clone, Copy)]
struct DrugRec {
    visit: usize,
    drug: Drug,
    start: i64,
    days: i64,
}

#[derive(Debug, Clone, Copy)]
struct MeasRec {
    visit: usize,
    meas: Meas,
    at: i64,
    value: f64,
}

#[derive(Debug, Clone, Copy)]
struct ProcRec {
    visit: usize,
    proc_: Proc,
    at: i64,
}

/// One resident, simulated; reused across residents to keep allocations down.
pub(crate) struct Life<'a> {
    net: &'a Network,
    settings: &'a Settings,
    /// `settings.region`.
    region: bool,
    /// `settings.start` and `settings.end`.
    window_start: i32,
    window_end: i32,
    seed: u64,
    rng: ChaCha8Rng,
    pid: i64,
    next_row: i64,
    male: bool,
    birth: i32,
    home: Home,
    chronic: Vec<ChronicState>,
    regimen: Vec<(Chronic, Drug)>,
    nsaid: Option<Drug>,
    bp_offset: f64,
    a1c: f64,
    adult_weight: f64,
    adherence: f64,
    followups_running: bool,
    busy_until: i64,
    queue: BinaryHeap<Reverse<(i32, u32, Trigger)>>,
    queued: u32,
    visits: Vec<VisitRec>,
    conds: Vec<CondRec>,
    drugs: Vec<DrugRec>,
    meas: Vec<MeasRec>,
    procs: Vec<ProcRec>,
    death: Option<(i32, usize, Cond)>,
    sites_seen: Vec<usize>,
}

impl<'a> Life<'a> {
    pub(crate) fn new(net: &'a Network, seed: u64, settings: &'a Settings) -> Self {
        Self {
            net,
            settings,
            region: settings.region,
            window_start: settings.start,
            window_end: settings.end,
            seed,
            rng: ChaCha8Rng::seed_from_u64(0),
            pid: 0,
            next_row: 0,
            male: false,
            birth: 0,
            home: Home {
                kind: HomeKind::Urban,
                village: None,
                township: None,
                county: None,
                tertiary: 0,
                location_id: 0,
            },
            chronic: Vec::new(),
            regimen: Vec::new(),
            nsaid: None,
            bp_offset: 0.0,
            a1c: 0.0,
            adult_weight: 0.0,
            adherence: 0.0,
            followups_running: false,
            busy_until: 0,
            queue: BinaryHeap::new(),
            queued: 0,
            visits: Vec::new(),
            conds: Vec::new(),
            drugs: Vec::new(),
            meas: Vec::new(),
            procs: Vec::new(),
            death: None,
            sites_seen: Vec::new(),
        }
    }

    /// Simulates resident `pid` and writes their rows to `sink`; returns the
    /// number of rows written.
    pub(crate) fn run(&mut self, pid: i64, sink: &mut impl Sink) -> u64 {
        self.reset(pid);
        self.simulate();
        self.emit(sink)
    }

    fn reset(&mut self, pid: i64) {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&pid.to_le_bytes());
        seed[16..24].copy_from_slice(&mix(self.seed, pid as u64).to_le_bytes());
        seed[24..].copy_from_slice(b"resident");
        self.rng = ChaCha8Rng::from_seed(seed);
        self.pid = pid;
        self.next_row = 1;
        self.chronic.clear();
        self.regimen.clear();
        self.queue.clear();
        self.queued = 0;
        self.visits.clear();
        self.conds.clear();
        self.drugs.clear();
        self.meas.clear();
        self.procs.clear();
        self.death = None;
        self.sites_seen.clear();
        self.followups_running = false;
        self.busy_until = i64::MIN;
    }

    fn next_id(&mut self) -> i64 {
        let id = self.pid * ID_STRIDE + self.next_row;
        self.next_row += 1;
        id
    }

    fn age_at(&self, day: i32) -> f64 {
        f64::from(day - self.birth) / 365.25
    }

    fn schedule(&mut self, day: i32, trigger: Trigger) {
        if day <= self.window_end {
            self.queued += 1;
            self.queue.push(Reverse((day, self.queued, trigger)));
        }
    }

    fn has(&self, kind: Chronic, day: i32) -> bool {
        self.chronic
            .iter()
            .any(|c| c.kind == kind && c.onset <= day)
    }

    fn treated(&self, kind: Chronic, day: i32) -> bool {
        self.chronic
            .iter()
            .any(|c| c.kind == kind && c.diagnosed.is_some_and(|d| d <= day))
    }

    // ---- the resident's attributes -------------------------------------------

    fn draw_resident(&mut self) {
        self.home = self.net.draw_home(&mut self.rng);
        let rng = &mut self.rng;
        self.male = chance(rng, 0.51);
        // Age at the end of the window by five-year band, from a regional
        // pyramid reshaped by where the resident lives: working-age adults
        // have left villages for the cities, leaving children and old people.
        const BANDS: [f64; 20] = [
            5.0, 5.6, 5.6, 5.0, 4.2, 4.6, 5.6, 6.2, 6.8, 7.8, 8.4, 8.0, 7.6, 6.8, 5.2, 3.6, 2.3,
            1.2, 0.5, 0.1,
        ];
        let (child, young, middle, old) = match self.home.kind {
            HomeKind::Village => (1.35, 0.55, 1.0, 1.6),
            HomeKind::Township => (1.1, 0.85, 1.0, 1.2),
            HomeKind::CountyTown => (1.0, 1.1, 1.0, 0.9),
            HomeKind::Urban => (0.8, 1.4, 1.0, 0.75),
        };
        let mut weights = [(0u8, 0.0); 20];
        for (i, w) in BANDS.iter().enumerate() {
            let factor = match i {
                0..=2 => child,
                3..=8 => young,
                9..=12 => middle,
                _ => old,
            };
            weights[i] = (i as u8, w * factor);
        }
        let band = f64::from(pick(rng, &weights));
        let age_days = (band * 5.0 + rng.random::<f64>() * 5.0) * 365.25;
        self.birth = self.window_end - age_days as i32;
        self.bp_offset = normal(rng, 0.0, 9.0);
        self.a1c = normal(rng, 7.5, 1.1).clamp(5.8, 13.0);
        self.adult_weight = if self.male {
            normal(rng, 66.0, 10.0)
        } else {
            normal(rng, 56.0, 9.0)
        }
        .clamp(38.0, 120.0);
        self.adherence = 0.35 + rng.random::<f64>() * 1.0;
    }

    /// Chronic conditions: prevalence rising with age at the window's end,
    /// with onset spread over adult life (some during the window).
    fn draw_chronic(&mut self) {
        let age = self.age_at(self.window_end);
        let male = self.male;
        let mut list: Vec<(Chronic, f64, f64)> = Vec::new();
        // (kind, probability, earliest onset age)
        let htn = 0.55 * logistic((age - 62.0) / 9.0);
        list.push((Chronic::Hypertension, htn, 30.0));
        list.push((Chronic::Diabetes, 0.2 * logistic((age - 58.0) / 9.0), 30.0));
        list.push((
            Chronic::Copd,
            if male { 0.16 } else { 0.06 } * logistic((age - 64.0) / 7.0),
            40.0,
        ));
        list.push((
            Chronic::Cad,
            0.16 * logistic((age - 68.0) / 7.0) * if male { 1.3 } else { 0.8 },
            40.0,
        ));
        list.push((
            Chronic::AtrialFibrillation,
            0.07 * logistic((age - 75.0) / 6.0),
            50.0,
        ));
        list.push((
            Chronic::HeartFailure,
            0.06 * logistic((age - 76.0) / 6.0),
            50.0,
        ));
        list.push((
            Chronic::Osteoarthritis,
            0.3 * logistic((age - 62.0) / 8.0) * if male { 0.8 } else { 1.2 },
            40.0,
        ));
        list.push((
            Chronic::Hyperlipidemia,
            0.2 * logistic((age - 52.0) / 10.0),
            30.0,
        ));
        list.push((Chronic::Ckd, 0.06 * logistic((age - 70.0) / 7.0), 40.0));
        list.push((Chronic::Asthma, if age < 18.0 { 0.05 } else { 0.025 }, 2.0));
        list.push((
            Chronic::LowBackPain,
            0.1 * logistic((age - 45.0) / 10.0),
            25.0,
        ));
        list.push((Chronic::Gerd, 0.06 * logistic((age - 35.0) / 10.0), 20.0));
        for (kind, mut p, min_age) in list {
            if age < min_age {
                continue;
            }
            // Comorbidity clustering.
            let has = |k: Chronic, v: &Vec<ChronicState>| v.iter().any(|c| c.kind == k);
            if kind == Chronic::Diabetes && has(Chronic::Hypertension, &self.chronic) {
                p *= 1.6;
            }
            if kind == Chronic::Ckd
                && (has(Chronic::Diabetes, &self.chronic)
                    || has(Chronic::Hypertension, &self.chronic))
            {
                p *= 2.0;
            }
            if kind == Chronic::HeartFailure
                && (has(Chronic::Cad, &self.chronic) || has(Chronic::Hypertension, &self.chronic))
            {
                p *= 1.8;
            }
            if !chance(&mut self.rng, p.min(0.95)) {
                continue;
            }
            let onset_age = min_age + self.rng.random::<f64>() * (age - min_age);
            let onset = self.birth + (onset_age * 365.25) as i32;
            // Awareness: not every case is known to the health system.
            let aware = match kind {
                Chronic::Hypertension => 0.55,
                Chronic::Diabetes => 0.6,
                Chronic::Copd => 0.4,
                Chronic::Ckd => 0.35,
                Chronic::Hyperlipidemia => 0.4,
                _ => 0.75,
            };
            let diagnosed = chance(&mut self.rng, aware).then_some(onset);
            self.chronic.push(ChronicState {
                kind,
                onset,
                diagnosed,
            });
        }
        self.draw_regimen();
    }

    /// The drugs each condition is treated with, chosen once per resident.
    fn draw_regimen(&mut self) {
        let kinds: Vec<Chronic> = self.chronic.iter().map(|c| c.kind).collect();
        for kind in kinds {
            self.add_regimen(kind);
        }
        let sore = self
            .chronic
            .iter()
            .any(|c| matches!(c.kind, Chronic::Osteoarthritis | Chronic::LowBackPain));
        self.nsaid = (sore && chance(&mut self.rng, 0.6)).then(|| {
            pick(
                &mut self.rng,
                &[
                    (vocab::IBUPROFEN, 0.5),
                    (vocab::DICLOFENAC, 0.3),
                    (vocab::CELECOXIB, 0.2),
                ],
            )
        });
    }

    fn add_regimen(&mut self, kind: Chronic) {
        let rng = &mut self.rng;
        let add = |d: Drug, regimen: &mut Vec<(Chronic, Drug)>| regimen.push((kind, d));
        match kind {
            Chronic::Hypertension => {
                let first = pick(
                    rng,
                    &[
                        (vocab::AMLODIPINE, 0.45),
                        (vocab::LOSARTAN, 0.25),
                        (vocab::LISINOPRIL, 0.15),
                        (vocab::HCTZ, 0.15),
                    ],
                );
                add(first, &mut self.regimen);
                if chance(rng, 0.3) {
                    let second = if first == vocab::HCTZ {
                        vocab::AMLODIPINE
                    } else {
                        vocab::HCTZ
                    };
                    add(second, &mut self.regimen);
                }
            }
            Chronic::Diabetes => {
                let insulin = chance(rng, 0.22);
                if !insulin || chance(rng, 0.5) {
                    add(vocab::METFORMIN, &mut self.regimen);
                }
                if insulin {
                    add(vocab::INSULIN, &mut self.regimen);
                }
            }
            Chronic::Cad => {
                add(vocab::ASPIRIN, &mut self.regimen);
                if chance(rng, 0.6) {
                    add(vocab::SIMVASTATIN, &mut self.regimen);
                }
            }
            Chronic::AtrialFibrillation => {
                if chance(rng, 0.35) {
                    add(vocab::WARFARIN, &mut self.regimen);
                }
            }
            Chronic::HeartFailure => add(vocab::FUROSEMIDE, &mut self.regimen),
            Chronic::Copd => {
                if chance(rng, 0.65) {
                    add(vocab::ALBUTEROL, &mut self.regimen);
                }
                if chance(rng, 0.35) {
                    add(vocab::FLUTICASONE_SALMETEROL, &mut self.regimen);
                }
            }
            Chronic::Asthma => {
                add(vocab::ALBUTEROL, &mut self.regimen);
                if chance(rng, 0.4) {
                    add(vocab::FLUTICASONE_SALMETEROL, &mut self.regimen);
                }
            }
            Chronic::Hyperlipidemia => {
                if chance(rng, 0.6) {
                    add(vocab::SIMVASTATIN, &mut self.regimen);
                }
            }
            Chronic::PostStroke => {
                add(vocab::ASPIRIN, &mut self.regimen);
                if chance(rng, 0.5) {
                    add(vocab::SIMVASTATIN, &mut self.regimen);
                }
            }
            Chronic::Osteoarthritis | Chronic::LowBackPain | Chronic::Gerd | Chronic::Ckd => {}
        }
    }

    // ---- the timeline ----------------------------------------------------------

    fn simulate(&mut self) {
        self.draw_resident();
        self.draw_chronic();
        let first_day = self.birth.max(self.window_start);
        let background_death = self.draw_background_death(first_day);

        // Known chronic disease: follow-up from the window's start; disease
        // found during the window: a diagnosis visit at onset.
        let mut any_known = false;
        for i in 0..self.chronic.len() {
            let c = self.chronic[i];
            if !c.kind.followed_up() {
                continue;
            }
            match c.diagnosed {
                Some(d) if d < self.window_start => any_known = true,
                Some(d) => self.schedule(d, Trigger::Diagnose(i)),
                None => {}
            }
        }
        if any_known {
            self.start_followups(self.window_start);
        }
        self.schedule_minor(first_day);
        self.schedule_severe(first_day);

        while let Some(Reverse((day, _, trigger))) = self.queue.pop() {
            if self.death.is_some() || background_death.is_some_and(|d| day >= d) {
                break;
            }
            if i64::from(day) * DAY_US < self.busy_until {
                // In hospital: chronic follow-up waits, anything else is
                // handled by the stay itself.
                if matches!(trigger, Trigger::FollowUp | Trigger::Diagnose(_)) {
                    let next = day_of(self.busy_until) + self.rng.random_range(7..30);
                    self.schedule(next, trigger);
                }
                continue;
            }
            match trigger {
                Trigger::FollowUp => self.followup(day, None),
                Trigger::Diagnose(i) => self.followup(day, Some(i)),
                Trigger::Minor => self.minor(day),
                Trigger::Severe(kind) => self.severe(day, kind),
                Trigger::Pneumonia(referrer) => self.pneumonia(day, referrer),
                Trigger::StepDown(from) => self.step_down(day, from),
                Trigger::Readmit(from) => self.readmit(day, from),
            }
        }

        if self.death.is_none()
            && let Some(day) = background_death
            && let Some(last) = self.visits.last()
        {
            let site = last.site;
            let day = day.max(day_of(last.end));
            let cause = self.background_cause(day);
            self.death = Some((day, site, cause));
        }
    }

    /// Deaths outside hospital: Gompertz mortality by age.
    fn draw_background_death(&mut self, first_day: i32) -> Option<i32> {
        let mut day = first_day;
        while day <= self.window_end {
            let age = self.age_at(day);
            let hazard = 0.0004 * (0.085 * (age - 30.0)).exp();
            if chance(&mut self.rng, 1.0 - (-hazard / 12.0).exp()) {
                return Some(day + self.rng.random_range(0..30));
            }
            day += 30;
        }
        None
    }

    fn background_cause(&mut self, day: i32) -> Cond {
        for kind in [
            Chronic::HeartFailure,
            Chronic::Copd,
            Chronic::Cad,
            Chronic::PostStroke,
            Chronic::Ckd,
            Chronic::Diabetes,
            Chronic::Hypertension,
        ] {
            if self.has(kind, day) {
                return kind.cond();
            }
        }
        pick(
            &mut self.rng,
            &[
                (vocab::STROKE, 0.3),
                (vocab::MYOCARDIAL_INFARCTION, 0.2),
                (vocab::PNEUMONIA, 0.2),
                (vocab::COPD, 0.15),
                (vocab::SEPSIS, 0.1),
                (vocab::GI_HEMORRHAGE, 0.05),
            ],
        )
    }

    fn followup_rate(&self, day: i32) -> f64 {
        let n = self
            .chronic
            .iter()
            .filter(|c| c.kind.followed_up() && c.diagnosed.is_some_and(|d| d <= day))
            .count() as f64;
        let rate = (self.adherence * (2.5 + 1.5 * (n - 1.0).max(0.0))).min(12.0);
        if self.region
            && (self.treated(Chronic::Hypertension, day) || self.treated(Chronic::Diabetes, day))
        {
            // Registered hypertension and diabetes: the basic public health
            // service books four follow-ups a year, monthly for the most
            // adherent fifth.
            let floor = if self.adherence > 1.15 { 12.0 } else { 4.0 };
            return rate.max(floor);
        }
        rate
    }

    fn start_followups(&mut self, from: i32) {
        if self.followups_running {
            return;
        }
        self.followups_running = true;
        // The first visit falls anywhere in the first interval.
        let rate = self.followup_rate(from.max(self.window_start)).max(0.5);
        let gap = (self.rng.random::<f64>() * 365.25 / rate).ceil() as i32;
        self.schedule(from + gap.max(1), Trigger::FollowUp);
    }

    /// Minor illness: a Poisson process by age, with respiratory infections
    /// following the winter season (drawn by thinning).
    fn schedule_minor(&mut self, first_day: i32) {
        const BOUND: f64 = 3.6 * 1.3 * 1.4;
        let chest = self
            .chronic
            .iter()
            .any(|c| matches!(c.kind, Chronic::Copd | Chronic::Asthma));
        let mut day = first_day;
        loop {
            day += gap_days(&mut self.rng, BOUND);
            if day > self.window_end {
                break;
            }
            let age = self.age_at(day);
            let base = match age {
                a if a < 1.0 => 3.0,
                a if a < 5.0 => 3.6,
                a if a < 15.0 => 1.8,
                a if a < 45.0 => 0.6,
                a if a < 65.0 => 0.9,
                a if a < 80.0 => 1.3,
                _ => 1.6,
            } * if chest { 1.3 } else { 1.0 };
            let rate = base * (0.45 * respiratory_season(day) + 0.55);
            if chance(&mut self.rng, rate / BOUND) {
                self.schedule(day, Trigger::Minor);
            }
        }
    }

    /// Severe events: yearly hazards by age and comorbidity.
    fn schedule_severe(&mut self, first_day: i32) {
        let (first_year, _, _) = civil_from_days(self.window_start);
        let (last_year, _, _) = civil_from_days(self.window_end);
        for year in first_year..=last_year {
            let y0 = days_from_civil(year, 1, 1).max(first_day);
            let y1 = days_from_civil(year, 12, 31).min(self.window_end);
            if y0 > y1 {
                continue;
            }
            let span = f64::from(y1 - y0 + 1) / 365.25;
            let mid = (y0 + y1) / 2;
            let age = self.age_at(mid);
            let has = |k| self.has(k, mid);
            let male = self.male;
            let warfarin = self.regimen.iter().any(|r| r.1 == vocab::WARFARIN);
            let mut hazards: Vec<(Severe, f64)> = Vec::with_capacity(8);
            if age >= 30.0 {
                let mut h = 0.0004 * ((age - 50.0) / 10.0).exp();
                if has(Chronic::Hypertension) {
                    h *= 2.0;
                }
                if has(Chronic::AtrialFibrillation) {
                    h *= 3.0;
                }
                if has(Chronic::Diabetes) {
                    h *= 1.5;
                }
                hazards.push((Severe::Stroke, h));
                let mut h = 0.0003 * ((age - 50.0) / 11.0).exp();
                if has(Chronic::Cad) {
                    h *= 3.0;
                }
                if has(Chronic::Diabetes) {
                    h *= 1.5;
                }
                if male {
                    h *= 1.3;
                }
                hazards.push((Severe::MyocardialInfarction, h));
            }
            if age >= 18.0 {
                let mut h = 0.0003 * ((age - 50.0) / 15.0).exp();
                if self.nsaid.is_some() {
                    h *= 3.0;
                }
                if warfarin {
                    h *= 2.0;
                }
                hazards.push((Severe::GiBleed, h));
            }
            if has(Chronic::HeartFailure) {
                hazards.push((Severe::HeartFailureExacerbation, 0.3));
            }
            if has(Chronic::Copd) {
                hazards.push((Severe::CopdExacerbation, 0.35));
            }
            if age >= 60.0 {
                let h = 0.0008 * ((age - 70.0) / 8.0).exp() * if male { 1.0 } else { 2.0 };
                hazards.push((Severe::HipFracture, h));
            }
            let forearm = match age {
                a if (5.0..15.0).contains(&a) => 0.01,
                a if a >= 60.0 && !male => 0.004,
                _ => 0.002,
            };
            hazards.push((Severe::ForearmFracture, forearm));
            let appendix = if (5.0..45.0).contains(&age) {
                0.0012
            } else {
                0.0004
            };
            hazards.push((Severe::Appendicitis, appendix));
            for (kind, h) in hazards {
                if chance(&mut self.rng, 1.0 - (-(h.min(2.0)) * span).exp()) {
                    let day = self.rng.random_range(y0..=y1);
                    self.schedule(day, Trigger::Severe(kind));
                }
            }
        }
    }

    // ---- where care happens ---------------------------------------------------------

    fn site_by(&mut self, weights: [f64; 4]) -> usize {
        let tier = pick(
            &mut self.rng,
            &[
                (Tier::Village, weights[0]),
                (Tier::Township, weights[1]),
                (Tier::County, weights[2]),
                (Tier::Tertiary, weights[3]),
            ],
        );
        self.home.at_or_above(tier)
    }

    /// Where minor illness is seen: children and old people in villages
    /// stay with the village doctor more than working-age adults do.
    fn minor_site(&mut self, day: i32) -> usize {
        let age = self.age_at(day);
        let dependant = !(15.0..65.0).contains(&age);
        self.site_by(match self.home.kind {
            HomeKind::Village if dependant => [0.72, 0.21, 0.05, 0.02],
            HomeKind::Village => [0.45, 0.35, 0.15, 0.05],
            HomeKind::Township => [0.0, 0.8, 0.17, 0.03],
            HomeKind::CountyTown => [0.0, 0.0, 0.85, 0.15],
            HomeKind::Urban => [0.0, 0.0, 0.25, 0.75],
        })
    }

    /// Where chronic disease is followed up; complex patients go higher.
    fn chronic_site(&mut self, day: i32) -> usize {
        let complex = self.treated(Chronic::HeartFailure, day)
            || self.treated(Chronic::Ckd, day)
            || self.regimen.iter().any(|r| r.1 == vocab::INSULIN);
        let mut w = match self.home.kind {
            HomeKind::Village => [0.4, 0.45, 0.13, 0.02],
            HomeKind::Township => [0.0, 0.8, 0.18, 0.02],
            HomeKind::CountyTown => [0.0, 0.0, 0.9, 0.1],
            HomeKind::Urban => [0.0, 0.0, 0.3, 0.7],
        };
        if complex {
            w = [
                w[0] * 0.3,
                w[1] * 0.6,
                w[2] + w[0] * 0.5 + w[1] * 0.3,
                w[3] + 0.1,
            ];
        }
        self.site_by(w)
    }

    /// The hospital for an emergency.
    fn hospital(&mut self) -> usize {
        self.site_by(match self.home.kind {
            HomeKind::Village | HomeKind::Township => [0.0, 0.0, 0.75, 0.25],
            HomeKind::CountyTown => [0.0, 0.0, 0.85, 0.15],
            HomeKind::Urban => [0.0, 0.0, 0.15, 0.85],
        })
    }

    // ---- visits ----------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn open_visit(
        &mut self,
        site: usize,
        concept: i64,
        start: i64,
        end: i64,
        preceding: Option<usize>,
        admitted_from: Option<i64>,
        discharged_to: Option<i64>,
    ) -> usize {
        let net = self.net;
        let profile = &net.profiles[site];
        let provider_k = if concept == vocab::OUTPATIENT_VISIT {
            // The same doctor for the same resident at a site.
            (mix(self.pid as u64, site as u64) % profile.providers as u64) as i64
        } else {
            self.rng.random_range(0..profile.providers)
        };
        let id = self.next_id();
        // Region mode: a visit referred up from a primary-care site (village
        // clinic, township centre) is admitted from the office.
        let admitted_from = match preceding {
            Some(p)
                if self.region
                    && matches!(
                        net.tier(self.visits[p].site),
                        Tier::Village | Tier::Township
                    )
                    && net.tier(site) < net.tier(self.visits[p].site) =>
            {
                Some(vocab::POS_OFFICE)
            }
            _ => admitted_from,
        };
        let preceding = preceding.map(|i| self.visits[i].id);
        if !self.sites_seen.contains(&site) {
            self.sites_seen.push(site);
        }
        self.visits.push(VisitRec {
            id,
            site,
            concept,
            start,
            end,
            provider: net.provider_id(site, provider_k),
            preceding,
            admitted_from,
            discharged_to,
            charge: 0.0,
            drug_cost: 0.0,
        });
        self.visits.len() - 1
    }

    fn daytime(&mut self, day: i32) -> i64 {
        i64::from(day) * DAY_US + 8 * HOUR_US + self.rng.random_range(0..9 * 60) * MINUTE_US
    }

    fn outpatient(&mut self, site: usize, day: i32, preceding: Option<usize>) -> usize {
        let start = self.daytime(day);
        let end = start + self.rng.random_range(10..45) * MINUTE_US;
        self.open_visit(
            site,
            vocab::OUTPATIENT_VISIT,
            start,
            end,
            preceding,
            None,
            None,
        )
    }

    fn condition(&mut self, visit: usize, cond: Cond, days: Option<i32>) {
        let day = day_of(self.visits[visit].start);
        self.conds.push(CondRec {
            visit,
            cond,
            end: days.map(|d| day + d),
        });
    }

    fn prescribe(&mut self, visit: usize, drug: Drug, days: i64) {
        let start = self.visits[visit].start;
        self.drugs.push(DrugRec {
            visit,
            drug,
            start,
            days: days.max(1),
        });
    }

    fn measure(&mut self, visit: usize, meas: Meas, value: f64) {
        let v = &self.visits[visit];
        let at = v.start + self.rng.random_range(5..30) * MINUTE_US;
        let value = round_to(value.clamp(meas.limits.0, meas.limits.1), meas.decimals);
        self.meas.push(MeasRec {
            visit,
            meas,
            at: at.min(v.end.max(v.start)),
            value,
        });
    }

    fn procedure(&mut self, visit: usize, proc_: Proc) {
        let at = self.visits[visit].start + self.rng.random_range(10..120) * MINUTE_US;
        self.procs.push(ProcRec { visit, proc_, at });
    }

    fn tier(&self, visit: usize) -> Tier {
        self.net.tier(self.visits[visit].site)
    }

    fn has_lab(&self, visit: usize) -> bool {
        self.tier(visit) != Tier::Village
    }

    fn blood_pressure(&mut self, visit: usize, hypertensive: bool, acute: f64) {
        let day = day_of(self.visits[visit].start);
        let age = self.age_at(day);
        let mean = if hypertensive {
            let treated = self.treated(Chronic::Hypertension, day);
            match (treated, self.region) {
                // Region mode: about 60% of treated patients' readings under 140.
                (true, true) => 136.0,
                (true, false) => 142.0,
                (false, _) => 156.0,
            }
        } else {
            112.0 + 0.45 * (age - 30.0).max(0.0)
        } + self.bp_offset
            + acute;
        let sbp = normal(&mut self.rng, mean, 12.0);
        let dbp = 0.45 * sbp + normal(&mut self.rng, 22.0, 6.0);
        self.measure(visit, vocab::SYSTOLIC_BP, sbp);
        self.measure(visit, vocab::DIASTOLIC_BP, dbp.min(sbp - 15.0));
    }

    fn weight_at(&mut self, day: i32) -> f64 {
        let age = self.age_at(day);
        let w = match age {
            a if a < 1.0 => 3.4 + a * 6.5,
            a if a < 12.0 => 9.5 + 2.6 * a,
            a if a < 18.0 => {
                let adult = self.adult_weight;
                let child = 9.5 + 2.6 * 12.0;
                child + (adult - child) * (a - 12.0) / 6.0
            }
            a if a > 75.0 => self.adult_weight * 0.93,
            _ => self.adult_weight,
        };
        w + normal(&mut self.rng, 0.0, 0.8)
    }

    fn temperature(&mut self, visit: usize, febrile: bool) {
        let day = day_of(self.visits[visit].start);
        let child = self.age_at(day) < 10.0;
        let t = if febrile {
            normal(&mut self.rng, if child { 38.4 } else { 38.0 }, 0.6)
        } else {
            normal(&mut self.rng, 36.6, 0.3)
        };
        self.measure(visit, vocab::BODY_TEMPERATURE, t);
    }

    /// Records the resident's chronic conditions at a hospital stay (found
    /// ones become known).
    fn comorbidities(&mut self, visit: usize, day: i32, principal: Cond) {
        let mut found = false;
        for i in 0..self.chronic.len() {
            let c = self.chronic[i];
            if c.onset > day || c.kind.cond() == principal {
                continue;
            }
            if c.diagnosed.is_none_or(|d| d > day) {
                if !chance(&mut self.rng, 0.5) {
                    continue;
                }
                self.chronic[i].diagnosed = Some(day);
                found |= c.kind.followed_up();
            }
            self.condition(visit, c.kind.cond(), None);
        }
        if found {
            // Follow-up after discharge (the stay pushes it past its end).
            self.start_followups(day + 14);
        }
    }

    fn continue_regimen(&mut self, visit: usize, day: i32, days: i64) {
        for i in 0..self.regimen.len() {
            let (kind, drug) = self.regimen[i];
            if self.treated(kind, day) && chance(&mut self.rng, 0.7) {
                self.prescribe(visit, drug, days);
            }
        }
    }

    /// A chronic-disease visit: follow-up, or the visit where a condition is
    /// first diagnosed.
    fn followup(&mut self, day: i32, diagnosis: Option<usize>) {
        if let Some(i) = diagnosis {
            self.chronic[i].diagnosed = Some(day);
        }
        let active: Vec<Chronic> = self
            .chronic
            .iter()
            .filter(|c| c.kind.followed_up() && c.diagnosed.is_some_and(|d| d <= day))
            .map(|c| c.kind)
            .collect();
        if diagnosis.is_some() {
            self.start_followups(day);
        } else {
            let rate = self.followup_rate(day).max(0.5);
            let gap = revisit_days(&mut self.rng, rate);
            self.schedule(day + gap, Trigger::FollowUp);
        }
        if active.is_empty() || self.outside_network(0.5) {
            return;
        }
        let mut site = self.chronic_site(day);
        if diagnosis.is_some() && self.net.tier(site) == Tier::Village && chance(&mut self.rng, 0.6)
        {
            site = self.home.at_or_above(Tier::Township);
        }
        let v = self.outpatient(site, day, None);
        let tier = self.net.tier(site);
        let fine_coding = matches!(tier, Tier::County | Tier::Tertiary);
        for (n, &kind) in active.iter().enumerate() {
            if n == 0
                || Some(kind) == diagnosis.map(|i| self.chronic[i].kind)
                || chance(&mut self.rng, 0.85)
            {
                let cond = if kind == Chronic::Copd && fine_coding && chance(&mut self.rng, 0.3) {
                    vocab::EMPHYSEMA
                } else {
                    kind.cond()
                };
                self.condition(v, cond, None);
            }
        }
        let htn = active.contains(&Chronic::Hypertension);
        // Region mode: the follow-up form of registered patients at primary
        // care always records blood pressure (hypertension) and fasting
        // glucose (diabetes).
        let registered = self.region && matches!(tier, Tier::Village | Tier::Township);
        let record_bp = self.net.profiles[site].bp_recording;
        let p_bp = match (htn, registered) {
            (true, true) => 1.0,
            (true, false) => record_bp,
            (false, _) => record_bp * 0.5,
        };
        if chance(&mut self.rng, p_bp) {
            self.blood_pressure(v, htn, 0.0);
        }
        if chance(
            &mut self.rng,
            if tier == Tier::Village { 0.12 } else { 0.3 },
        ) {
            let w = self.weight_at(day);
            self.measure(v, vocab::BODY_WEIGHT, w);
        }
        if active.contains(&Chronic::Diabetes) {
            if chance(&mut self.rng, if registered { 1.0 } else { 0.7 }) {
                let g = if self.region {
                    // Fasting: about 60% under 126 mg/dL (7.0 mmol/L).
                    normal(&mut self.rng, 118.0 + 20.0 * (self.a1c - 7.5), 20.0)
                } else {
                    normal(&mut self.rng, 60.0 + 13.0 * self.a1c, 25.0)
                };
                self.measure(v, vocab::GLUCOSE, g);
            }
            if self.has_lab(v) && (diagnosis.is_some() || chance(&mut self.rng, 0.35)) {
                let a = normal(&mut self.rng, self.a1c, 0.5);
                self.measure(v, vocab::HBA1C, a);
            }
        }
        if active.contains(&Chronic::Ckd) && self.has_lab(v) && chance(&mut self.rng, 0.4) {
            let c = normal(&mut self.rng, 1.9, 0.4);
            self.measure(v, vocab::CREATININE, c);
        }
        if active.contains(&Chronic::Hyperlipidemia)
            && self.has_lab(v)
            && chance(&mut self.rng, 0.3)
        {
            let c = normal(&mut self.rng, 235.0, 30.0);
            self.measure(v, vocab::CHOLESTEROL, c);
        }
        if (active.contains(&Chronic::Cad) || active.contains(&Chronic::AtrialFibrillation))
            && tier != Tier::Village
            && chance(&mut self.rng, 0.2)
        {
            self.procedure(v, vocab::ECG);
        }
        if active.contains(&Chronic::HeartFailure) && fine_coding && chance(&mut self.rng, 0.1) {
            self.procedure(v, vocab::ECHOCARDIOGRAPHY);
        }
        let supply = self.net.profiles[site].chronic_supply;
        for i in 0..self.regimen.len() {
            let (kind, drug) = self.regimen[i];
            if active.contains(&kind) && chance(&mut self.rng, 0.85) {
                let days = if drug == vocab::INSULIN { 30 } else { supply };
                self.prescribe(v, drug, days);
            }
        }
        self.finish_visit(v);
        self.busy_until = self.busy_until.max(self.visits[v].end);
    }

    /// Minor illness seen as an outpatient (or, for small children and the
    /// very old with fever, in an emergency room).
    fn minor(&mut self, day: i32) {
        let age = self.age_at(day);
        let season = respiratory_season(day);
        let respiratory = chance(&mut self.rng, 0.45 * season / (0.45 * season + 0.55));
        let cond = if respiratory {
            if age < 10.0 {
                pick(
                    &mut self.rng,
                    &[
                        (vocab::ACUTE_URI, 0.35),
                        (vocab::PHARYNGITIS, 0.2),
                        (vocab::BRONCHITIS, 0.15),
                        (vocab::OTITIS_MEDIA, 0.15),
                        (vocab::FEVER, 0.1),
                        (vocab::SINUSITIS, 0.05),
                    ],
                )
            } else {
                pick(
                    &mut self.rng,
                    &[
                        (vocab::ACUTE_URI, 0.35),
                        (vocab::PHARYNGITIS, 0.25),
                        (vocab::BRONCHITIS, 0.25),
                        (vocab::SINUSITIS, 0.15),
                    ],
                )
            }
        } else {
            let adult = age >= 18.0;
            let female_adult = adult && !self.male;
            let oa = if self.has(Chronic::Osteoarthritis, day) {
                0.35
            } else {
                0.0
            };
            let lbp = if self.has(Chronic::LowBackPain, day) {
                0.35
            } else {
                0.0
            };
            pick(
                &mut self.rng,
                &[
                    (vocab::HEADACHE, 0.12),
                    (vocab::DIARRHEA, if age < 10.0 { 0.35 } else { 0.15 }),
                    (vocab::CYSTITIS, if female_adult { 0.18 } else { 0.02 }),
                    (vocab::LACERATION_HAND, 0.1),
                    (
                        vocab::SPRAIN_ANKLE,
                        if (8.0..60.0).contains(&age) {
                            0.1
                        } else {
                            0.03
                        },
                    ),
                    (vocab::GERD, if adult { 0.08 } else { 0.0 }),
                    (vocab::PEPTIC_ULCER, if adult { 0.05 } else { 0.0 }),
                    (vocab::OSTEOARTHRITIS, oa),
                    (vocab::LOW_BACK_PAIN, lbp),
                ],
            )
        };
        let febrile = respiratory || cond == vocab::FEVER;
        if self.outside_network(0.65) {
            let p = self.pneumonia_risk(day);
            if respiratory && chance(&mut self.rng, p) {
                let later = day + self.rng.random_range(2..6);
                self.schedule(later, Trigger::Pneumonia(None));
            }
            return;
        }
        let emergency = febrile && !(5.0..=75.0).contains(&age) && chance(&mut self.rng, 0.05);
        let v = if emergency {
            let site = self.hospital();
            let start = i64::from(day) * DAY_US + self.rng.random_range(0..24 * 60) * MINUTE_US;
            let end = start + self.rng.random_range(2 * 60..6 * 60) * MINUTE_US;
            self.open_visit(
                site,
                vocab::EMERGENCY_VISIT,
                start,
                end,
                None,
                Some(vocab::POS_HOME),
                Some(vocab::POS_HOME),
            )
        } else {
            let site = self.minor_site(day);
            self.outpatient(site, day, None)
        };
        let site = self.visits[v].site;
        let tier = self.net.tier(site);
        let profile = self.net.profiles[site].clone();
        let coded = if respiratory && chance(&mut self.rng, profile.coarse_coding) {
            vocab::ACUTE_URI
        } else {
            cond
        };
        let duration = if respiratory {
            self.rng.random_range(5..12)
        } else {
            self.rng.random_range(3..21)
        };
        let chronic_flare = cond == vocab::OSTEOARTHRITIS || cond == vocab::LOW_BACK_PAIN;
        self.condition(v, coded, (!chronic_flare).then_some(duration));
        if febrile && chance(&mut self.rng, 0.7) {
            self.temperature(v, true);
        }
        if febrile && chance(&mut self.rng, 0.3) {
            let hr = normal(&mut self.rng, if age < 5.0 { 125.0 } else { 92.0 }, 12.0);
            self.measure(v, vocab::HEART_RATE, hr);
        }
        if age >= 35.0 && chance(&mut self.rng, profile.bp_recording * 0.4) {
            let htn = self.has(Chronic::Hypertension, day);
            self.blood_pressure(v, htn, 0.0);
        }
        if age < 6.0 && chance(&mut self.rng, 0.3) {
            let w = self.weight_at(day);
            self.measure(v, vocab::BODY_WEIGHT, w);
        }
        if respiratory {
            let base = match tier {
                Tier::Village => 0.55,
                Tier::Township => 0.45,
                Tier::County => 0.3,
                Tier::Tertiary => 0.2,
            };
            if chance(&mut self.rng, (base * profile.antibiotics).min(0.95)) {
                let drug = pick(
                    &mut self.rng,
                    &[
                        (vocab::AMOXICILLIN, 0.45),
                        (vocab::AZITHROMYCIN, 0.25),
                        (vocab::CEFUROXIME, 0.2),
                        (vocab::AMOX_CLAV, 0.1),
                    ],
                );
                let days = if drug == vocab::AZITHROMYCIN {
                    3
                } else {
                    self.rng.random_range(5..8)
                };
                self.prescribe(v, drug, days);
            }
            // The rural "drip": intravenous fluids for a cold.
            if matches!(tier, Tier::Village | Tier::Township)
                && chance(&mut self.rng, 0.15 * profile.antibiotics)
            {
                self.procedure(v, vocab::IV_INJECTION);
                let days = self.rng.random_range(1..4);
                self.prescribe(v, vocab::SALINE, days);
                // Region mode: often with an antibiotic in the bag.
                if self.region && chance(&mut self.rng, 0.35) {
                    self.prescribe(v, vocab::CEFTRIAXONE, days);
                }
            }
            if chance(&mut self.rng, 0.5) {
                self.prescribe(v, vocab::ACETAMINOPHEN, 3);
            } else if age >= 12.0 && chance(&mut self.rng, 0.3) {
                self.prescribe(v, vocab::IBUPROFEN, 3);
            }
        } else if cond == vocab::CYSTITIS {
            let drug = if chance(&mut self.rng, 0.6) {
                vocab::CEFUROXIME
            } else {
                vocab::AMOX_CLAV
            };
            self.prescribe(v, drug, 5);
        } else if cond == vocab::LACERATION_HAND {
            self.procedure(v, vocab::SUTURE);
            if chance(&mut self.rng, 0.5) {
                self.procedure(v, vocab::TETANUS);
            }
        } else if cond == vocab::SPRAIN_ANKLE {
            if tier != Tier::Village && chance(&mut self.rng, 0.5) {
                self.procedure(v, vocab::XRAY_ANKLE);
            }
            self.prescribe(v, vocab::IBUPROFEN, 5);
        } else if chronic_flare {
            let drug = self.nsaid.unwrap_or(vocab::IBUPROFEN);
            let days = self.rng.random_range(14..31);
            self.prescribe(v, drug, days);
            if tier == Tier::Village && chance(&mut self.rng, 0.2) {
                self.procedure(v, vocab::IM_INJECTION);
            }
        } else if cond == vocab::HEADACHE {
            self.prescribe(v, vocab::ACETAMINOPHEN, 3);
        }
        self.finish_visit(v);
        self.busy_until = self.busy_until.max(self.visits[v].end);

        if respiratory {
            let p = self.pneumonia_risk(day);
            if chance(&mut self.rng, p) {
                let later = day + self.rng.random_range(2..6);
                self.schedule(later, Trigger::Pneumonia(Some(v)));
            }
        }
    }

    /// The chance that a respiratory infection turns into pneumonia.
    fn pneumonia_risk(&self, day: i32) -> f64 {
        let mut p = match self.age_at(day) {
            a if a < 5.0 => 0.04,
            a if a < 65.0 => 0.01,
            a if a < 80.0 => 0.06,
            _ => 0.12,
        };
        if self.has(Chronic::Copd, day) {
            p *= 2.0;
        }
        if self.has(Chronic::HeartFailure, day) {
            p *= 1.5;
        }
        p
    }

    /// Whether routine care happens outside the network: city residents use
    /// community health centres, which are not part of it.
    fn outside_network(&mut self, share: f64) -> bool {
        self.home.kind == HomeKind::Urban && chance(&mut self.rng, share)
    }

    /// Pneumonia: an outpatient course for the young and fit, otherwise an
    /// admission (township beds, county or tertiary), sometimes through the
    /// emergency room, sometimes transferred up.
    fn pneumonia(&mut self, day: i32, referrer: Option<usize>) {
        let age = self.age_at(day);
        let copd = self.has(Chronic::Copd, day);
        let severe = !(2.0..75.0).contains(&age) || (copd && chance(&mut self.rng, 0.5));
        let admit = !(5.0..65.0).contains(&age) || severe || chance(&mut self.rng, 0.3);
        if !admit {
            let site = self.home.at_or_above(Tier::County);
            let v = self.outpatient(site, day, referrer);
            self.condition(v, vocab::PNEUMONIA, Some(14));
            self.procedure(v, vocab::CHEST_XRAY);
            self.temperature(v, true);
            if chance(&mut self.rng, 0.6) {
                let wbc = normal(&mut self.rng, 12.5, 3.5);
                self.measure(v, vocab::LEUKOCYTES, wbc);
            }
            let drug = if chance(&mut self.rng, 0.6) {
                vocab::AMOXICILLIN
            } else {
                vocab::AZITHROMYCIN
            };
            self.prescribe(v, drug, 7);
            self.finish_visit(v);
            return;
        }
        let township_bed = !severe && self.home.township.is_some() && chance(&mut self.rng, 0.3);
        let site = if township_bed {
            self.home.at_or_above(Tier::Township)
        } else {
            self.hospital()
        };
        let via_er = !township_bed && chance(&mut self.rng, 0.5);
        let sepsis = age >= 65.0 && chance(&mut self.rng, 0.06);
        let los = self.rng.random_range(5..10)
            + if age >= 75.0 {
                self.rng.random_range(0..5)
            } else {
                0
            };
        let cfr = match age {
            a if a >= 80.0 => 0.08,
            a if a >= 65.0 => 0.03,
            _ => 0.005,
        } * if sepsis { 3.0 } else { 1.0 };
        let stay = Stay {
            site,
            day,
            referrer,
            via_er,
            los,
            principal: vocab::PNEUMONIA,
            transfer: if severe { 0.2 } else { 0.03 },
            cfr,
        };
        self.admission(stay, |life, v, first| {
            life.pneumonia_care(v, first, age, sepsis)
        });
    }

    /// Care for each inpatient visit of a pneumonia stay.
    fn pneumonia_care(&mut self, v: usize, first: bool, age: f64, sepsis: bool) {
        if first {
            self.procedure(v, vocab::CHEST_XRAY);
            self.temperature(v, true);
            let wbc = normal(&mut self.rng, 13.0, 4.0);
            self.measure(v, vocab::LEUKOCYTES, wbc);
        }
        if sepsis {
            self.condition(v, vocab::SEPSIS, None);
        }
        let stay_days = self.stay_days(v);
        let drug = if chance(&mut self.rng, 0.7) {
            vocab::CEFTRIAXONE
        } else {
            vocab::AZITHROMYCIN
        };
        self.prescribe(v, drug, stay_days);
        self.prescribe(v, vocab::SALINE, (stay_days / 2).max(1));
        self.procedure(v, vocab::IV_INJECTION);
        if age >= 65.0 && chance(&mut self.rng, 0.5) {
            self.procedure(v, vocab::OXYGEN_MASK);
        }
        if sepsis && self.tier(v) == Tier::Tertiary && chance(&mut self.rng, 0.3) {
            self.procedure(v, vocab::INTUBATION);
        }
    }

    fn stay_days(&self, v: usize) -> i64 {
        let r = &self.visits[v];
        i64::from(day_of(r.end) - day_of(r.start)).max(1)
    }

    /// A hospital stay: optional ER visit, the admission, perhaps a transfer
    /// to the tertiary hospital, then discharge home or death. `care` fills
    /// each inpatient visit (`first` is true for the first one). Returns the
    /// last visit.
    fn admission(&mut self, stay: Stay, mut care: impl FnMut(&mut Self, usize, bool)) -> usize {
        let Stay {
            site,
            day,
            referrer,
            via_er,
            los,
            principal,
            transfer,
            cfr,
        } = stay;
        let tier = self.net.tier(site);
        let can_er = matches!(tier, Tier::County | Tier::Tertiary);
        let referred_from = referrer.map(|_| vocab::POS_OUTPATIENT_HOSPITAL);
        let mut start = if let Some(r) = referrer {
            (i64::from(day) * DAY_US + 9 * HOUR_US).max(self.visits[r].end + HOUR_US)
        } else {
            i64::from(day) * DAY_US + self.rng.random_range(0..20 * 60) * MINUTE_US
        };
        let mut preceding = referrer;
        let mut admitted_from = referred_from.unwrap_or(vocab::POS_HOME);
        if via_er && can_er {
            let end = start + self.rng.random_range(90..300) * MINUTE_US;
            let er = self.open_visit(
                site,
                vocab::EMERGENCY_VISIT,
                start,
                end,
                preceding,
                Some(admitted_from),
                Some(vocab::POS_INPATIENT_HOSPITAL),
            );
            self.condition(er, principal, None);
            self.blood_pressure(er, self.has(Chronic::Hypertension, day), 8.0);
            let hr = normal(&mut self.rng, 96.0, 14.0);
            self.measure(er, vocab::HEART_RATE, hr);
            self.finish_visit(er);
            preceding = Some(er);
            admitted_from = vocab::POS_EMERGENCY_ROOM;
            start = end + self.rng.random_range(20..120) * MINUTE_US;
        }
        let escalate = tier == Tier::County && chance(&mut self.rng, transfer);
        let first_los = if escalate {
            self.rng.random_range(1..4).min(los)
        } else {
            los
        };
        let end = i64::from(day_of(start) + first_los as i32) * DAY_US
            + (9 * 60 + self.rng.random_range(0..5 * 60)) * MINUTE_US;
        let v = self.open_visit(
            site,
            vocab::INPATIENT_VISIT,
            start,
            end,
            preceding,
            Some(admitted_from),
            Some(if escalate {
                vocab::POS_INPATIENT_HOSPITAL
            } else {
                vocab::POS_HOME
            }),
        );
        self.inpatient_basics(v, principal, day);
        care(self, v, true);
        let mut last = v;
        if escalate {
            let t_start = end + self.rng.random_range(60..240) * MINUTE_US;
            let t_los = (los - first_los).max(3) + self.rng.random_range(0..4);
            let t_end = i64::from(day_of(t_start) + t_los as i32) * DAY_US
                + (9 * 60 + self.rng.random_range(0..5 * 60)) * MINUTE_US;
            let t = self.open_visit(
                self.home.tertiary,
                vocab::INPATIENT_VISIT,
                t_start,
                t_end,
                Some(v),
                Some(vocab::POS_INPATIENT_HOSPITAL),
                Some(vocab::POS_HOME),
            );
            self.inpatient_basics(t, principal, day_of(t_start));
            care(self, t, false);
            last = t;
        }
        self.finish_visit(v);
        if last != v {
            self.finish_visit(last);
        }
        self.busy_until = self.busy_until.max(self.visits[last].end);
        if chance(&mut self.rng, cfr) {
            self.visits[last].discharged_to = self.region.then_some(vocab::PATIENT_DIED);
            let r = &self.visits[last];
            self.death = Some((day_of(r.end), r.site, principal));
        } else if self.region {
            self.after_discharge(last, principal);
        }
        last
    }

    /// Region mode: what may follow a discharge home. Chronic patients of the
    /// hospitals are often referred down to their local clinic (discharged to
    /// the office, seen there within two weeks); heart failure, COPD and
    /// pneumonia are sometimes readmitted within 30 days.
    fn after_discharge(&mut self, last: usize, principal: Cond) {
        let site = self.visits[last].site;
        let hospital = matches!(self.net.tier(site), Tier::County | Tier::Tertiary);
        let local = self.home.township.is_some() || self.home.village.is_some();
        let discharged = day_of(self.visits[last].end);
        let chronic = [
            vocab::STROKE,
            vocab::HEART_FAILURE,
            vocab::HIP_FRACTURE,
            vocab::COPD,
            vocab::MYOCARDIAL_INFARCTION,
        ]
        .contains(&principal);
        if hospital && chronic && local && chance(&mut self.rng, 0.45) {
            self.visits[last].discharged_to = Some(vocab::POS_OFFICE);
            let day = discharged + self.rng.random_range(2..=13);
            self.schedule(day, Trigger::StepDown(last));
        }
        let readmit = match principal {
            vocab::HEART_FAILURE => 0.2,
            vocab::COPD => 0.15,
            vocab::PNEUMONIA => 0.1,
            _ => 0.0,
        };
        if readmit > 0.0 && chance(&mut self.rng, readmit) {
            let day = discharged + self.rng.random_range(3..=29);
            self.schedule(day, Trigger::Readmit(last));
        }
    }

    /// The principal diagnosis of a visit (its first condition).
    fn principal_of(&self, visit: usize) -> Option<Cond> {
        self.conds.iter().find(|c| c.visit == visit).map(|c| c.cond)
    }

    /// Region mode: the visit at the local clinic after a downward referral
    /// (admitted from the inpatient hospital, following the discharge): the
    /// discharge diagnosis, blood pressure, the chronic regimen.
    fn step_down(&mut self, day: i32, from: usize) {
        let site = match (self.home.village, self.home.township) {
            (Some(v), Some(t)) => {
                if chance(&mut self.rng, 0.4) {
                    v
                } else {
                    t
                }
            }
            (Some(v), None) => v,
            (None, Some(t)) => t,
            (None, None) => return,
        };
        let start = self.daytime(day).max(self.visits[from].end + HOUR_US);
        let end = start + self.rng.random_range(15..40) * MINUTE_US;
        let v = self.open_visit(
            site,
            vocab::OUTPATIENT_VISIT,
            start,
            end,
            Some(from),
            Some(vocab::POS_INPATIENT_HOSPITAL),
            None,
        );
        if let Some(cond) = self.principal_of(from) {
            self.condition(v, cond, None);
        }
        let htn = self.has(Chronic::Hypertension, day);
        self.blood_pressure(v, htn, 0.0);
        let supply = self.net.profiles[site].chronic_supply;
        self.continue_regimen(v, day, supply);
        self.finish_visit(v);
        self.busy_until = self.busy_until.max(self.visits[v].end);
    }

    /// Region mode: readmission to the hospital of an earlier stay, with the
    /// same principal diagnosis.
    fn readmit(&mut self, day: i32, from: usize) {
        let Some(principal) = self.principal_of(from) else {
            return;
        };
        let age = self.age_at(day);
        let older = if age >= 80.0 { 1.5 } else { 1.0 };
        let stay = Stay {
            site: self.visits[from].site,
            day,
            referrer: None,
            via_er: chance(&mut self.rng, 0.6),
            los: self.rng.random_range(4..10),
            principal,
            transfer: 0.05,
            cfr: 0.04 * older,
        };
        if principal == vocab::PNEUMONIA {
            let sepsis = age >= 65.0 && chance(&mut self.rng, 0.06);
            self.admission(stay, |life, v, first| {
                life.pneumonia_care(v, first, age, sepsis)
            });
        } else {
            let kind = if principal == vocab::HEART_FAILURE {
                Severe::HeartFailureExacerbation
            } else {
                Severe::CopdExacerbation
            };
            self.admission(stay, |life, v, first| life.acute_care(kind, v, first));
        }
    }

    /// What every admission records: diagnoses, vital signs, basic labs and
    /// continued chronic medication.
    fn inpatient_basics(&mut self, v: usize, principal: Cond, day: i32) {
        self.condition(v, principal, None);
        self.comorbidities(v, day, principal);
        let htn = self.has(Chronic::Hypertension, day);
        self.blood_pressure(v, htn, 5.0);
        let hr = normal(&mut self.rng, 88.0, 12.0);
        self.measure(v, vocab::HEART_RATE, hr);
        let w = self.weight_at(day);
        self.measure(v, vocab::BODY_WEIGHT, w);
        let hb = normal(&mut self.rng, if self.male { 13.8 } else { 12.4 }, 1.2);
        self.measure(v, vocab::HEMOGLOBIN, hb);
        let ckd = self.has(Chronic::Ckd, day);
        let cr = normal(
            &mut self.rng,
            if ckd { 2.0 } else { 0.9 },
            if ckd { 0.5 } else { 0.2 },
        );
        self.measure(v, vocab::CREATININE, cr);
        let g = if self.has(Chronic::Diabetes, day) {
            normal(&mut self.rng, 70.0 + 13.0 * self.a1c, 30.0)
        } else {
            normal(&mut self.rng, 100.0, 15.0)
        };
        self.measure(v, vocab::GLUCOSE, g);
        if self.treated(Chronic::Diabetes, day) {
            let a = normal(&mut self.rng, self.a1c, 0.5);
            self.measure(v, vocab::HBA1C, a);
        }
        let days = self.stay_days(v);
        self.continue_regimen(v, day, days);
    }

    /// Severe events: an optional first stop at the local clinic, then the
    /// hospital.
    fn severe(&mut self, day: i32, kind: Severe) {
        let age = self.age_at(day);
        let rural = matches!(self.home.kind, HomeKind::Village | HomeKind::Township);
        let referrer = if rural && kind != Severe::Appendicitis && chance(&mut self.rng, 0.25) {
            let site = self.minor_site(day);
            let v = self.outpatient(site, day, None);
            let first_look = match kind {
                Severe::Stroke => vocab::HEADACHE,
                Severe::GiBleed => vocab::PEPTIC_ULCER,
                Severe::HeartFailureExacerbation => vocab::HEART_FAILURE,
                Severe::CopdExacerbation => vocab::COPD,
                Severe::HipFracture => vocab::HIP_FRACTURE,
                Severe::ForearmFracture => vocab::FOREARM_FRACTURE,
                Severe::MyocardialInfarction | Severe::Appendicitis => {
                    vocab::CORONARY_ATHEROSCLEROSIS
                }
            };
            self.condition(v, first_look, Some(1));
            self.blood_pressure(v, self.has(Chronic::Hypertension, day), 10.0);
            self.finish_visit(v);
            Some(v)
        } else {
            None
        };
        match kind {
            Severe::ForearmFracture => {
                let site = if rural && chance(&mut self.rng, 0.4) {
                    self.home.at_or_above(Tier::Township)
                } else {
                    self.home.at_or_above(Tier::County)
                };
                let er = self.net.tier(site) != Tier::Township && chance(&mut self.rng, 0.5);
                let v = if er {
                    let start = self
                        .daytime(day)
                        .max(referrer.map_or(0, |r| self.visits[r].end + HOUR_US));
                    let end = start + self.rng.random_range(90..240) * MINUTE_US;
                    self.open_visit(
                        site,
                        vocab::EMERGENCY_VISIT,
                        start,
                        end,
                        referrer,
                        Some(referrer.map_or(vocab::POS_HOME, |_| vocab::POS_OUTPATIENT_HOSPITAL)),
                        Some(vocab::POS_HOME),
                    )
                } else {
                    let v = self.outpatient(site, day, referrer);
                    if let Some(r) = referrer {
                        let start = self.visits[v].start.max(self.visits[r].end + HOUR_US);
                        let len = self.visits[v].end - self.visits[v].start;
                        self.visits[v].start = start;
                        self.visits[v].end = start + len;
                    }
                    v
                };
                self.condition(v, vocab::FOREARM_FRACTURE, Some(42));
                self.procedure(v, vocab::XRAY_WRIST);
                self.prescribe(v, vocab::IBUPROFEN, 7);
                self.finish_visit(v);
                self.busy_until = self.busy_until.max(self.visits[v].end);
            }
            _ => {
                let site = self.hospital();
                let older = if age >= 80.0 { 1.5 } else { 1.0 };
                let (los, transfer, cfr, via_er, principal) = match kind {
                    Severe::Stroke => (
                        self.rng.random_range(8..20),
                        0.25,
                        0.1 * older,
                        0.8,
                        vocab::STROKE,
                    ),
                    Severe::MyocardialInfarction => (
                        self.rng.random_range(5..12),
                        0.5,
                        0.08 * older,
                        0.85,
                        vocab::MYOCARDIAL_INFARCTION,
                    ),
                    Severe::GiBleed => (
                        self.rng.random_range(4..10),
                        0.15,
                        0.04 * older,
                        0.7,
                        vocab::GI_HEMORRHAGE,
                    ),
                    Severe::HeartFailureExacerbation => (
                        self.rng.random_range(5..12),
                        0.08,
                        0.05 * older,
                        0.6,
                        vocab::HEART_FAILURE,
                    ),
                    Severe::CopdExacerbation => (
                        self.rng.random_range(5..12),
                        0.05,
                        0.03 * older,
                        0.4,
                        vocab::COPD,
                    ),
                    Severe::HipFracture => (
                        self.rng.random_range(8..18),
                        0.1,
                        0.04 * older,
                        0.7,
                        vocab::HIP_FRACTURE,
                    ),
                    Severe::Appendicitis | Severe::ForearmFracture => (
                        self.rng.random_range(3..7),
                        0.0,
                        0.002,
                        0.8,
                        vocab::APPENDICITIS,
                    ),
                };
                // COPD exacerbations are often treated in township beds.
                let site = if kind == Severe::CopdExacerbation
                    && self.home.township.is_some()
                    && chance(&mut self.rng, 0.35)
                {
                    self.home.at_or_above(Tier::Township)
                } else {
                    site
                };
                let stay = Stay {
                    site,
                    day,
                    referrer,
                    via_er: chance(&mut self.rng, via_er),
                    los,
                    principal,
                    transfer,
                    cfr,
                };
                self.admission(stay, |life, v, first| life.acute_care(kind, v, first));
                if self.death.is_none() {
                    match kind {
                        Severe::Stroke => self.add_chronic(Chronic::PostStroke, day),
                        Severe::MyocardialInfarction => self.add_chronic(Chronic::Cad, day),
                        _ => {}
                    }
                }
            }
        }
    }

    /// Event-specific care for each inpatient visit of a severe event.
    fn acute_care(&mut self, kind: Severe, v: usize, first: bool) {
        let tier = self.tier(v);
        let days = self.stay_days(v);
        match kind {
            Severe::Stroke => {
                if first {
                    self.procedure(v, vocab::CT_HEAD);
                }
                if tier == Tier::Tertiary && chance(&mut self.rng, 0.15) {
                    self.prescribe(v, vocab::ALTEPLASE, 1);
                }
                self.prescribe(v, vocab::ASPIRIN, days);
                if chance(&mut self.rng, 0.4) {
                    self.prescribe(v, vocab::CLOPIDOGREL, days);
                }
                self.prescribe(v, vocab::SIMVASTATIN, days);
                if chance(&mut self.rng, 0.1) {
                    self.procedure(v, vocab::INTUBATION);
                }
            }
            Severe::MyocardialInfarction => {
                self.procedure(v, vocab::ECG);
                if tier == Tier::Tertiary && chance(&mut self.rng, 0.6) {
                    self.procedure(v, vocab::PCI);
                }
                if tier != Tier::Township && chance(&mut self.rng, 0.5) {
                    self.procedure(v, vocab::ECHOCARDIOGRAPHY);
                }
                self.prescribe(v, vocab::ASPIRIN, days);
                self.prescribe(v, vocab::CLOPIDOGREL, days);
                self.prescribe(v, vocab::SIMVASTATIN, days);
                self.prescribe(v, vocab::ENOXAPARIN, days.min(5));
                if first {
                    self.prescribe(v, vocab::NITROGLYCERIN, 1);
                    if chance(&mut self.rng, 0.5) {
                        self.prescribe(v, vocab::MORPHINE, 1);
                    }
                }
            }
            Severe::GiBleed => {
                let hb = normal(&mut self.rng, 8.4, 1.5);
                self.measure(v, vocab::HEMOGLOBIN, hb);
                if chance(&mut self.rng, 0.35) {
                    self.procedure(v, vocab::TRANSFUSION);
                }
                self.prescribe(v, vocab::SALINE, days.min(4));
                self.prescribe(v, vocab::ONDANSETRON, 1);
                if first && (self.nsaid.is_some() || chance(&mut self.rng, 0.3)) {
                    self.condition(v, vocab::PEPTIC_ULCER, None);
                }
            }
            Severe::HeartFailureExacerbation => {
                self.prescribe(v, vocab::FUROSEMIDE_IV, days.min(5));
                self.procedure(v, vocab::OXYGEN_MASK);
                if tier != Tier::Township && chance(&mut self.rng, 0.4) {
                    self.procedure(v, vocab::ECHOCARDIOGRAPHY);
                }
                if chance(&mut self.rng, 0.5) {
                    self.procedure(v, vocab::CHEST_XRAY);
                }
            }
            Severe::CopdExacerbation => {
                self.procedure(v, vocab::OXYGEN_MASK);
                self.prescribe(v, vocab::PREDNISONE, 5);
                self.prescribe(v, vocab::ALBUTEROL, days);
                let drug = if chance(&mut self.rng, 0.5) {
                    vocab::AZITHROMYCIN
                } else {
                    vocab::CEFTRIAXONE
                };
                self.prescribe(v, drug, days.min(7));
                if first {
                    self.procedure(v, vocab::CHEST_XRAY);
                    let febrile = chance(&mut self.rng, 0.4);
                    self.temperature(v, febrile);
                }
            }
            Severe::HipFracture => {
                if first {
                    self.procedure(v, vocab::XRAY_PELVIS);
                }
                self.prescribe(v, vocab::ENOXAPARIN, days);
                self.prescribe(v, vocab::ACETAMINOPHEN, days);
                if chance(&mut self.rng, 0.3) {
                    self.prescribe(v, vocab::MORPHINE, 2);
                }
                // Region mode: surgery at the hospital that keeps the patient.
                let transferred =
                    self.visits[v].discharged_to == Some(vocab::POS_INPATIENT_HOSPITAL);
                if self.region
                    && !transferred
                    && matches!(tier, Tier::County | Tier::Tertiary)
                    && chance(&mut self.rng, 0.65)
                {
                    self.procedure(v, vocab::HIP_REPLACEMENT);
                }
            }
            Severe::Appendicitis | Severe::ForearmFracture => {
                self.temperature(v, true);
                let wbc = normal(&mut self.rng, 14.0, 3.0);
                self.measure(v, vocab::LEUKOCYTES, wbc);
                self.procedure(v, vocab::APPENDECTOMY);
                self.prescribe(v, vocab::CEFTRIAXONE, days.min(3));
                self.prescribe(v, vocab::SALINE, 2);
            }
        }
    }

    fn add_chronic(&mut self, kind: Chronic, day: i32) {
        if let Some(c) = self.chronic.iter_mut().find(|c| c.kind == kind) {
            if c.diagnosed.is_none_or(|d| d > day) {
                c.diagnosed = Some(day);
            }
        } else {
            self.chronic.push(ChronicState {
                kind,
                onset: day,
                diagnosed: Some(day),
            });
            if kind == Chronic::Cad {
                self.regimen.push((kind, vocab::ASPIRIN));
                self.regimen.push((kind, vocab::CLOPIDOGREL));
                self.regimen.push((kind, vocab::SIMVASTATIN));
            } else {
                self.add_regimen(kind);
            }
        }
        self.start_followups(day + 14);
    }

    /// Prices a finished visit: a tier and visit-type base, per-day charges
    /// for stays, and its drugs and procedures.
    fn finish_visit(&mut self, v: usize) {
        let net = self.net;
        let site = self.visits[v].site;
        let profile = &net.profiles[site];
        let (op, er, ip_day) = match net.tier(site) {
            Tier::Village => (5.0, 10.0, 30.0),
            Tier::Township => (12.0, 20.0, 45.0),
            Tier::County => (30.0, 55.0, 130.0),
            Tier::Tertiary => (55.0, 110.0, 320.0),
        };
        let r = &self.visits[v];
        let base = match r.concept {
            vocab::INPATIENT_VISIT => ip_day * self.stay_days(v) as f64,
            vocab::EMERGENCY_VISIT => er,
            _ => op,
        };
        let price = profile.price;
        let mut charge = base * price * normal(&mut self.rng, 0.0, 0.3).exp();
        // Region mode: drugs at the tier's markup times the site's habit
        // (exactly 1 otherwise, so the default charges are unchanged).
        let markup = if self.region {
            drug_markup(net.tier(site)) * profile.drug_habit
        } else {
            1.0
        };
        let mut drugs = 0.0;
        for d in self.drugs.iter().rev().take_while(|d| d.visit >= v) {
            if d.visit == v {
                let cost =
                    d.drug.unit_price * (d.days as f64 * d.drug.per_day).ceil() * price * markup;
                charge += cost;
                drugs += cost;
            }
        }
        for p in self.procs.iter().rev().take_while(|p| p.visit >= v) {
            if p.visit == v {
                charge += p.proc_.price * price;
            }
        }
        let charge = round_to(charge.clamp(0.5, MAX_CHARGE), 2);
        self.visits[v].charge = charge;
        self.visits[v].drug_cost = round_to(drugs, 2).min(charge);
    }

    // ---- rows ------------------------------------------------------------------

    fn emit(&mut self, sink: &mut impl Sink) -> u64 {
        if self.visits.is_empty() {
            return 0;
        }
        let mut rows = 0u64;
        let (year, month, dom) = civil_from_days(self.birth);
        let gender = if self.male {
            vocab::MALE
        } else {
            vocab::FEMALE
        };
        let (race, race_source): (i64, &'static str) = {
            let u = mix(self.pid as u64, 0x7ace) % 1000;
            match u {
                0..=909 => (vocab::RACE_ASIAN, "Han"),
                910..=939 => (vocab::RACE_ASIAN, "Tujia"),
                940..=964 => (vocab::RACE_ASIAN, "Miao"),
                965..=979 => (vocab::RACE_ASIAN, "Hui"),
                _ => (vocab::NO_MATCHING_CONCEPT, "not recorded"),
            }
        };
        let mut sites = std::mem::take(&mut self.sites_seen);
        sites.sort_unstable();
        let settings = self.settings;
        let dest = &settings.dest;
        // One person row and one observation period per output: a site, or in
        // region mode a node holding several sites' records.
        let mut outputs: Vec<usize> = sites.iter().map(|&s| dest[s]).collect();
        outputs.sort_unstable();
        outputs.dedup();
        for &out in &outputs {
            // The first site of this output the resident used, in network
            // order: the township centre before its villages.
            let site = sites
                .iter()
                .copied()
                .find(|&s| dest[s] == out)
                .unwrap_or(sites[0]);
            sink.person(
                out,
                Person {
                    person_id: self.pid,
                    gender_concept_id: gender,
                    year_of_birth: i64::from(year),
                    month_of_birth: Some(i64::from(month)),
                    day_of_birth: Some(i64::from(dom)),
                    birth_datetime: Some(i64::from(self.birth) * DAY_US),
                    race_concept_id: race,
                    ethnicity_concept_id: vocab::NOT_HISPANIC,
                    location_id: Some(self.home.location_id),
                    care_site_id: Some(self.net.sites[site].care_site_id),
                    person_source_value: Some(Text::Owned(format!("RHC{:010}", self.pid))),
                    gender_source_value: Some(Text::Borrowed(if self.male { "M" } else { "F" })),
                    race_source_value: Some(Text::Borrowed(race_source)),
                    ..Default::default()
                },
            );
            let (mut first, mut last) = (i32::MAX, i32::MIN);
            for r in self.visits.iter().filter(|r| dest[r.site] == out) {
                first = first.min(day_of(r.start));
                last = last.max(day_of(r.end));
            }
            if let Some((d, s, _)) = self.death
                && dest[s] == out
            {
                last = last.max(d);
            }
            let id = self.next_id();
            sink.observation_period(
                out,
                ObservationPeriod {
                    observation_period_id: id,
                    person_id: self.pid,
                    observation_period_start_date: first,
                    observation_period_end_date: last,
                    period_type_concept_id: vocab::EHR,
                },
            );
            rows += 2;
        }
        self.sites_seen = sites;

        for r in &self.visits {
            let source = match r.concept {
                vocab::INPATIENT_VISIT => "inpatient",
                vocab::EMERGENCY_VISIT => "emergency",
                _ => "outpatient",
            };
            sink.visit(
                dest[r.site],
                VisitOccurrence {
                    visit_occurrence_id: r.id,
                    person_id: self.pid,
                    visit_concept_id: r.concept,
                    visit_start_date: day_of(r.start),
                    visit_start_datetime: Some(r.start),
                    visit_end_date: day_of(r.end),
                    visit_end_datetime: Some(r.end),
                    visit_type_concept_id: vocab::EHR,
                    provider_id: Some(r.provider),
                    care_site_id: Some(self.net.sites[r.site].care_site_id),
                    visit_source_value: Some(Text::Borrowed(source)),
                    admitted_from_concept_id: r.admitted_from,
                    discharged_to_concept_id: r.discharged_to,
                    preceding_visit_occurrence_id: r.preceding,
                    ..Default::default()
                },
            );
            rows += 1;
        }
        for i in 0..self.conds.len() {
            let c = self.conds[i];
            let r = &self.visits[c.visit];
            let (site, visit_id, start, provider) = (r.site, r.id, r.start, r.provider);
            let id = self.next_id();
            sink.condition(
                dest[site],
                ConditionOccurrence {
                    condition_occurrence_id: id,
                    person_id: self.pid,
                    condition_concept_id: c.cond.id,
                    condition_start_date: day_of(start),
                    condition_start_datetime: Some(start),
                    condition_end_date: c.end,
                    condition_type_concept_id: vocab::EHR,
                    provider_id: Some(provider),
                    visit_occurrence_id: Some(visit_id),
                    condition_source_value: Some(Text::Borrowed(c.cond.icd10)),
                    ..Default::default()
                },
            );
            rows += 1;
        }
        for i in 0..self.drugs.len() {
            let d = self.drugs[i];
            let r = &self.visits[d.visit];
            let (site, visit_id, provider) = (r.site, r.id, r.provider);
            let id = self.next_id();
            let start_day = day_of(d.start);
            let end_day = start_day + d.days as i32 - 1;
            sink.drug(
                dest[site],
                DrugExposure {
                    drug_exposure_id: id,
                    person_id: self.pid,
                    drug_concept_id: d.drug.id,
                    drug_exposure_start_date: start_day,
                    drug_exposure_start_datetime: Some(d.start),
                    drug_exposure_end_date: end_day,
                    drug_exposure_end_datetime: Some(i64::from(end_day) * DAY_US + 23 * HOUR_US),
                    drug_type_concept_id: vocab::EHR,
                    refills: Some(0),
                    quantity: Some((d.days as f64 * d.drug.per_day).ceil()),
                    days_supply: Some(d.days),
                    provider_id: Some(provider),
                    visit_occurrence_id: Some(visit_id),
                    drug_source_value: Some(Text::Borrowed(d.drug.source)),
                    route_source_value: Some(Text::Borrowed(d.drug.route)),
                    ..Default::default()
                },
            );
            rows += 1;
        }
        for i in 0..self.procs.len() {
            let p = self.procs[i];
            let r = &self.visits[p.visit];
            let (site, visit_id, provider) = (r.site, r.id, r.provider);
            let id = self.next_id();
            sink.procedure(
                dest[site],
                ProcedureOccurrence {
                    procedure_occurrence_id: id,
                    person_id: self.pid,
                    procedure_concept_id: p.proc_.id,
                    procedure_date: day_of(p.at),
                    procedure_datetime: Some(p.at),
                    procedure_type_concept_id: vocab::EHR,
                    quantity: Some(1),
                    provider_id: Some(provider),
                    visit_occurrence_id: Some(visit_id),
                    procedure_source_value: Some(Text::Borrowed(p.proc_.source)),
                    ..Default::default()
                },
            );
            rows += 1;
        }
        for i in 0..self.meas.len() {
            let m = self.meas[i];
            let r = &self.visits[m.visit];
            let (site, visit_id, provider) = (r.site, r.id, r.provider);
            let id = self.next_id();
            let has_range = m.meas.range.1 > m.meas.range.0;
            sink.measurement(
                dest[site],
                Measurement {
                    measurement_id: id,
                    person_id: self.pid,
                    measurement_concept_id: m.meas.id,
                    measurement_date: day_of(m.at),
                    measurement_datetime: Some(m.at),
                    measurement_type_concept_id: vocab::EHR,
                    value_as_number: Some(m.value),
                    unit_concept_id: Some(m.meas.unit),
                    range_low: has_range.then_some(m.meas.range.0),
                    range_high: has_range.then_some(m.meas.range.1),
                    provider_id: Some(provider),
                    visit_occurrence_id: Some(visit_id),
                    measurement_source_value: Some(Text::Borrowed(m.meas.loinc)),
                    unit_source_value: Some(Text::Borrowed(m.meas.unit_source)),
                    ..Default::default()
                },
            );
            rows += 1;
        }
        for v in 0..self.visits.len() {
            let (site, visit_id, charge, concept, drug_cost) = {
                let r = &self.visits[v];
                (r.site, r.id, r.charge, r.concept, r.drug_cost)
            };
            let net = self.net;
            let profile = &net.profiles[site];
            let share = (profile.reimbursement
                + match concept {
                    vocab::INPATIENT_VISIT => 0.15,
                    vocab::EMERGENCY_VISIT => -0.1,
                    _ => -0.2,
                })
            .clamp(0.15, 0.9);
            let payer = round_to(charge * share, 2);
            let patient = round_to(charge - payer, 2);
            let id = self.next_id();
            sink.cost(
                dest[site],
                Cost {
                    cost_id: id,
                    cost_event_id: visit_id,
                    cost_domain_id: Text::Borrowed("Visit"),
                    cost_type_concept_id: vocab::EHR,
                    currency_concept_id: Some(vocab::USD),
                    total_charge: Some(charge),
                    total_paid: Some(round_to(payer + patient, 2)),
                    paid_by_payer: Some(payer),
                    paid_by_patient: Some(patient),
                    paid_ingredient_cost: self.region.then_some(drug_cost),
                    person_id: Some(self.pid),
                    ..Default::default()
                },
            );
            rows += 1;
        }
        if let Some((day, site, cause)) = self.death {
            sink.death(
                dest[site],
                Death {
                    person_id: self.pid,
                    death_date: day,
                    death_datetime: None,
                    death_type_concept_id: Some(vocab::EHR),
                    cause_concept_id: Some(cause.id),
                    cause_source_value: Some(Text::Borrowed(cause.icd10)),
                    cause_source_concept_id: None,
                },
            );
            rows += 1;
        }
        rows
    }
}

/// One hospital stay, as `Life::admission` takes it.
struct Stay {
    site: usize,
    day: i32,
    referrer: Option<usize>,
    via_er: bool,
    los: i64,
    principal: Cond,
    transfer: f64,
    cfr: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows as text, in the order they were written.
    #[derive(Default)]
    struct Collect(Vec<String>);

    impl Sink for Collect {
        fn person(&mut self, site: usize, row: Person) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn observation_period(&mut self, site: usize, row: ObservationPeriod) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn visit(&mut self, site: usize, row: VisitOccurrence) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn condition(&mut self, site: usize, row: ConditionOccurrence) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn drug(&mut self, site: usize, row: DrugExposure) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn procedure(&mut self, site: usize, row: ProcedureOccurrence) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn measurement(&mut self, site: usize, row: Measurement) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn death(&mut self, site: usize, row: Death) {
            self.0.push(format!("{site} {row:?}"));
        }
        fn cost(&mut self, site: usize, row: Cost) {
            self.0.push(format!("{site} {row:?}"));
        }
    }

    fn settings(net: &Network) -> Settings {
        Settings::per_site(
            net,
            days_from_civil(2019, 1, 1),
            days_from_civil(2024, 12, 31),
        )
    }

    #[test]
    fn a_residents_rows_do_not_depend_on_who_came_before() {
        let net = Network::new(6, 3);
        let settings = settings(&net);
        let mut reused = Life::new(&net, 3, &settings);
        let mut nonempty = 0;
        for pid in 1..200 {
            let mut fresh = Collect::default();
            let n = Life::new(&net, 3, &settings).run(pid, &mut fresh);
            let mut again = Collect::default();
            assert_eq!(reused.run(pid, &mut again), n);
            assert_eq!(fresh.0, again.0, "resident {pid}");
            assert_eq!(fresh.0.len() as u64, n);
            nonempty += usize::from(n > 0);
        }
        assert!(nonempty > 150, "{nonempty} of 199 residents used care");
        let mut other_seed = Collect::default();
        Life::new(&net, 4, &settings).run(5, &mut other_seed);
        let mut this_seed = Collect::default();
        Life::new(&net, 3, &settings).run(5, &mut this_seed);
        assert_ne!(other_seed.0, this_seed.0);
    }

    #[test]
    fn region_mode_sends_village_rows_to_the_township_node() {
        let net = Network::new(12, 5);
        let layout = crate::region::Layout::region(&net);
        let settings = Settings {
            region: true,
            dest: layout.node_of.clone(),
            ..settings(&net)
        };
        let mut life = Life::new(&net, 5, &settings);
        let mut died_in_hospital = 0;
        for pid in 1..1500 {
            let mut rows = Collect::default();
            life.run(pid, &mut rows);
            assert!(life.next_row < ID_STRIDE / 10, "resident {pid}");
            // One person row per node, and rows only in nodes that exist.
            let persons: Vec<&str> = rows
                .0
                .iter()
                .filter(|r| r.contains(" Person {"))
                .map(|r| r.split(' ').next().unwrap_or(""))
                .collect();
            let mut unique = persons.clone();
            unique.dedup();
            assert_eq!(persons, unique, "resident {pid}");
            for r in &rows.0 {
                let node: usize = r.split(' ').next().unwrap().parse().unwrap();
                assert!(node < layout.nodes.len());
            }
            died_in_hospital += life
                .visits
                .iter()
                .filter(|v| v.discharged_to == Some(vocab::PATIENT_DIED))
                .count();
        }
        assert!(died_in_hospital > 0);
    }

    #[test]
    fn ids_stay_within_the_residents_block() {
        let net = Network::new(5, 1);
        let settings = settings(&net);
        let mut life = Life::new(&net, 1, &settings);
        for pid in 1..300 {
            life.run(pid, &mut Collect::default());
            assert!(
                life.next_row < ID_STRIDE / 10,
                "resident {pid} used {} ids",
                life.next_row
            );
        }
    }
}
