//! The network: which institutions exist, how they nest geographically, and
//! the per-site habits that make their data differ.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::vocab;

/// The level of an institution in the regional referral hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The regional tertiary (teaching) hospital: specialists, ICU, PCI.
    Tertiary,
    /// A county hospital: emergency department, general wards.
    County,
    /// A township health centre: primary care, chronic follow-up, a few beds.
    Township,
    /// A village clinic: one or two village doctors, outpatient only.
    Village,
}

impl Tier {
    /// Lower-case name, as used in site names and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Tertiary => "tertiary",
            Tier::County => "county",
            Tier::Township => "township",
            Tier::Village => "village",
        }
    }

    /// What the tier is, in words.
    pub fn description(self) -> &'static str {
        match self {
            Tier::Tertiary => "regional tertiary hospital",
            Tier::County => "county hospital",
            Tier::Township => "township health centre",
            Tier::Village => "village clinic",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One institution of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// Directory and node name, such as `county-2`.
    pub name: String,
    /// Level in the hierarchy.
    pub tier: Tier,
    /// `care_site_id` (also its `location_id`); 1-based, in network order.
    pub care_site_id: i64,
}

/// The institutions of a network of `sites` sites, in output order: one
/// tertiary hospital, about a fifth county hospitals, then township health
/// centres (a third of the rest) and village clinics.
pub fn plan_sites(sites: usize) -> Vec<Site> {
    let (county, township, village) = tier_counts(sites);
    let mut out = Vec::with_capacity(sites);
    let mut add = |tier: Tier, n: usize| {
        for k in 1..=n {
            let care_site_id = out.len() as i64 + 1;
            out.push(Site {
                name: format!("{}-{k}", tier.as_str()),
                tier,
                care_site_id,
            });
        }
    };
    if sites > 0 {
        add(Tier::Tertiary, 1);
    }
    add(Tier::County, county);
    add(Tier::Township, township);
    add(Tier::Village, village);
    out
}

/// (county, township, village) counts for a network of `sites`.
fn tier_counts(sites: usize) -> (usize, usize, usize) {
    if sites <= 1 {
        return (0, 0, 0);
    }
    let county = (sites as f64 / 5.0).round().max(1.0) as usize;
    let county = county.min(sites - 1);
    let rest = sites - 1 - county;
    let township = if rest == 0 { 0 } else { rest.div_ceil(3) };
    (county, township, rest - township)
}

/// How a resident lives relative to the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HomeKind {
    /// In the regional city, near the tertiary hospital.
    Urban,
    /// In a county town.
    CountyTown,
    /// In a township seat.
    Township,
    /// In a village.
    Village,
}

/// A resident's home: the nearest site of each tier (site indexes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Home {
    pub(crate) kind: HomeKind,
    pub(crate) village: Option<usize>,
    pub(crate) township: Option<usize>,
    pub(crate) county: Option<usize>,
    pub(crate) tertiary: usize,
    /// `location_id` of the home.
    pub(crate) location_id: i64,
}

impl Home {
    /// The site of `tier`, or the nearest one above it.
    pub(crate) fn at_or_above(&self, tier: Tier) -> usize {
        let chain = [
            self.village,
            self.township,
            self.county,
            Some(self.tertiary),
        ];
        let start = match tier {
            Tier::Village => 0,
            Tier::Township => 1,
            Tier::County => 2,
            Tier::Tertiary => 3,
        };
        chain[start..]
            .iter()
            .flatten()
            .copied()
            .next()
            .unwrap_or(self.tertiary)
    }
}

/// Per-site habits: the random effects that make sites differ beyond their
/// tier (non-IID data across the federation).
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    /// Relative catchment size among sites of the same tier.
    pub(crate) size: f64,
    /// Multiplier on antibiotic prescribing for respiratory infections.
    pub(crate) antibiotics: f64,
    /// Probability that a visit records blood pressure when it should.
    pub(crate) bp_recording: f64,
    /// Multiplier on charges.
    pub(crate) price: f64,
    /// Share of charges the insurer pays (tier base plus a site effect).
    pub(crate) reimbursement: f64,
    /// Typical days of supply for chronic prescriptions.
    pub(crate) chronic_supply: i64,
    /// Number of providers.
    pub(crate) providers: i64,
    /// Whether respiratory infections are coded unspecifically (acute URI).
    pub(crate) coarse_coding: f64,
    /// Multiplier on drug prices in region mode (how much the site earns on
    /// drugs); drawn last, so the other habits do not depend on it.
    pub(crate) drug_habit: f64,
}

/// The network with everything the generator needs per site.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub(crate) sites: Vec<Site>,
    pub(crate) profiles: Vec<Profile>,
    /// Site indexes by tier.
    counties: Vec<usize>,
    townships: Vec<usize>,
    villages: Vec<usize>,
    /// Cumulative catchment weights per tier (same order as the lists above).
    county_cum: Vec<f64>,
    township_cum: Vec<f64>,
    village_cum: Vec<f64>,
}

/// Location ids for homes in the regional city (no site of its own).
pub(crate) const CITY_LOCATION_ID: i64 = 100_000;

impl Network {
    /// Lays out `sites` sites; per-site habits are drawn from `seed`.
    pub(crate) fn new(sites: usize, seed: u64) -> Self {
        let sites = plan_sites(sites);
        let mut profiles = Vec::with_capacity(sites.len());
        for (i, site) in sites.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0x5173_u64, i as u64));
            let (providers, reimbursement, supply) = match site.tier {
                Tier::Tertiary => (rng.random_range(150..260), 0.5, 60),
                Tier::County => (rng.random_range(35..80), 0.62, 60),
                Tier::Township => (rng.random_range(6..16), 0.7, 30),
                Tier::Village => (rng.random_range(1..3), 0.6, 30),
            };
            profiles.push(Profile {
                size: rng.random_range(0.4..1.6),
                antibiotics: rng.random_range(0.6..1.4),
                bp_recording: rng.random_range(0.65..0.99),
                price: rng.random_range(0.85..1.2),
                reimbursement: (reimbursement + rng.random_range(-0.08..0.08)),
                chronic_supply: if rng.random_bool(0.3) {
                    supply * 2
                } else {
                    supply
                }
                .min(90),
                providers,
                coarse_coding: match site.tier {
                    Tier::Village => rng.random_range(0.5..0.9),
                    Tier::Township => rng.random_range(0.3..0.6),
                    Tier::County => rng.random_range(0.1..0.3),
                    Tier::Tertiary => rng.random_range(0.0..0.15),
                },
                drug_habit: rng.random_range(0.8..1.25),
            });
        }
        let of = |tier: Tier| -> Vec<usize> {
            sites
                .iter()
                .enumerate()
                .filter(|(_, s)| s.tier == tier)
                .map(|(i, _)| i)
                .collect()
        };
        let counties = of(Tier::County);
        let townships = of(Tier::Township);
        let villages = of(Tier::Village);
        let cum = |list: &[usize]| -> Vec<f64> {
            let mut acc = 0.0;
            list.iter()
                .map(|&i| {
                    acc += profiles[i].size;
                    acc
                })
                .collect()
        };
        Self {
            county_cum: cum(&counties),
            township_cum: cum(&townships),
            village_cum: cum(&villages),
            counties,
            townships,
            villages,
            sites,
            profiles,
        }
    }

    /// Number of sites.
    pub(crate) fn len(&self) -> usize {
        self.sites.len()
    }

    /// The tier of site `i`.
    pub(crate) fn tier(&self, i: usize) -> Tier {
        self.sites[i].tier
    }

    /// The township site a village site belongs to (none for other tiers, or
    /// when the network has no township).
    pub(crate) fn township_of(&self, i: usize) -> Option<usize> {
        let pos = self.villages.iter().position(|&x| x == i)?;
        self.township_of_village(pos)
    }

    /// The county site a township site belongs to (none for other tiers, or
    /// when the network has no county).
    pub(crate) fn county_of(&self, i: usize) -> Option<usize> {
        let pos = self.townships.iter().position(|&x| x == i)?;
        self.county_of_township(pos)
    }

    /// The township a village belongs to, and the county a township belongs to.
    fn township_of_village(&self, v_pos: usize) -> Option<usize> {
        (!self.townships.is_empty()).then(|| self.townships[v_pos % self.townships.len()])
    }

    fn county_of_township(&self, t_pos: usize) -> Option<usize> {
        (!self.counties.is_empty()).then(|| self.counties[t_pos % self.counties.len()])
    }

    /// Draws a resident's home. Shares: 12% in the city, 18% in county towns,
    /// 25% in township seats, 45% in villages; a missing tier moves the
    /// resident up to the nearest existing one.
    pub(crate) fn draw_home(&self, rng: &mut impl Rng) -> Home {
        let u: f64 = rng.random();
        let mut kind = if u < 0.12 {
            HomeKind::Urban
        } else if u < 0.30 {
            HomeKind::CountyTown
        } else if u < 0.55 {
            HomeKind::Township
        } else {
            HomeKind::Village
        };
        if kind == HomeKind::Village && self.villages.is_empty() {
            kind = HomeKind::Township;
        }
        if kind == HomeKind::Township && self.townships.is_empty() {
            kind = HomeKind::CountyTown;
        }
        if kind == HomeKind::CountyTown && self.counties.is_empty() {
            kind = HomeKind::Urban;
        }
        let tertiary = 0;
        let pick = |cum: &[f64], rng: &mut dyn rand::RngCore| -> usize {
            let total = *cum.last().expect("non-empty tier");
            let x = rng.random_range(0.0..total);
            cum.partition_point(|&c| c <= x).min(cum.len() - 1)
        };
        match kind {
            HomeKind::Urban => Home {
                kind,
                village: None,
                township: None,
                // City residents use the tertiary hospital and, for some
                // care, a county hospital on the city's edge.
                county: (!self.counties.is_empty())
                    .then(|| self.counties[pick(&self.county_cum, rng)]),
                tertiary,
                location_id: CITY_LOCATION_ID,
            },
            HomeKind::CountyTown => {
                let c = self.counties[pick(&self.county_cum, rng)];
                Home {
                    kind,
                    village: None,
                    township: None,
                    county: Some(c),
                    tertiary,
                    location_id: self.sites[c].care_site_id,
                }
            }
            HomeKind::Township => {
                let t_pos = pick(&self.township_cum, rng);
                let t = self.townships[t_pos];
                Home {
                    kind,
                    village: None,
                    township: Some(t),
                    county: self.county_of_township(t_pos),
                    tertiary,
                    location_id: self.sites[t].care_site_id,
                }
            }
            HomeKind::Village => {
                let v_pos = pick(&self.village_cum, rng);
                let v = self.villages[v_pos];
                let t = self.township_of_village(v_pos);
                let t_pos = t.and_then(|t| self.townships.iter().position(|&x| x == t));
                Home {
                    kind,
                    village: Some(v),
                    township: t,
                    county: t_pos.and_then(|p| self.county_of_township(p)),
                    tertiary,
                    location_id: self.sites[v].care_site_id,
                }
            }
        }
    }

    /// `provider_id` of provider `k` of site `i`.
    pub(crate) fn provider_id(&self, i: usize, k: i64) -> i64 {
        self.sites[i].care_site_id * PROVIDER_STRIDE + k + 1
    }

    /// The place-of-service concept of site `i`'s care site.
    pub(crate) fn place_of_service(&self, i: usize) -> i64 {
        match self.tier(i) {
            Tier::Tertiary | Tier::County => vocab::POS_INPATIENT_HOSPITAL,
            Tier::Township => vocab::POS_OUTPATIENT_HOSPITAL,
            Tier::Village => vocab::POS_OFFICE,
        }
    }

    /// The county a township or village belongs to (for `location.county`).
    pub(crate) fn county_name_of(&self, i: usize) -> Option<String> {
        let site = &self.sites[i];
        let county = match site.tier {
            Tier::Tertiary => None,
            Tier::County => Some(i),
            Tier::Township => self.county_of(i),
            Tier::Village => self.county_of(self.township_of(i)?),
        }?;
        Some(self.sites[county].name.clone())
    }
}

/// Provider ids are `care_site_id * PROVIDER_STRIDE + k`.
pub(crate) const PROVIDER_STRIDE: i64 = 10_000;

/// SplitMix64 finaliser over two words: independent seeds from (seed, key).
pub(crate) fn mix(seed: u64, key: u64) -> u64 {
    let mut z = seed
        .wrapping_add(key.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_are_laid_out_as_documented() {
        let names = |n| -> Vec<String> { plan_sites(n).into_iter().map(|s| s.name).collect() };
        assert_eq!(names(1), ["tertiary-1"]);
        assert_eq!(names(2), ["tertiary-1", "county-1"]);
        assert_eq!(
            names(5),
            [
                "tertiary-1",
                "county-1",
                "township-1",
                "village-1",
                "village-2"
            ]
        );
        let ten = plan_sites(10);
        let count = |t| ten.iter().filter(|s| s.tier == t).count();
        assert_eq!(
            (
                count(Tier::Tertiary),
                count(Tier::County),
                count(Tier::Township),
                count(Tier::Village)
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(ten.last().map(|s| s.care_site_id), Some(10));
    }

    #[test]
    fn homes_fall_back_to_existing_tiers() {
        let net = Network::new(1, 7);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..100 {
            let home = net.draw_home(&mut rng);
            assert_eq!(home.kind, HomeKind::Urban);
            assert_eq!(home.at_or_above(Tier::Village), 0);
        }
        let net = Network::new(12, 7);
        for _ in 0..1000 {
            let home = net.draw_home(&mut rng);
            if let Some(v) = home.village {
                assert_eq!(net.tier(v), Tier::Village);
                assert!(home.township.is_some() && home.county.is_some());
            }
        }
    }
}
