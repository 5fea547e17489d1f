//! Region mode: which node directory holds each institution's records, and
//! the organisation tree (`region.toml`) a coordinator reads for the health
//! commission's supervision statistics.
//!
//! Without region mode every site is its own node ([`Layout::per_site`]).
//! With it ([`Layout::region`]) a village clinic's records are held by its
//! township health centre's node, as township centres keep the village
//! doctors' records in practice; a village without a township stays its own
//! node. The tree has one unit per institution, coded like Chinese
//! administrative divisions: the city `3701` (the tertiary hospital), counties
//! `3701CC`, townships `3701CCTTT`, villages `3701CCTTTVVV`.

use std::fmt::Write as _;

use crate::network::{Network, Tier, mix};

/// One output directory and the sites whose records it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeDef {
    /// The site the node is named after (its directory name).
    pub(crate) head: usize,
    /// Every site whose records it holds, in network order (the head first).
    pub(crate) sites: Vec<usize>,
}

/// The node directories of a run and where each site's rows go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The nodes, in network order of their heads.
    pub(crate) nodes: Vec<NodeDef>,
    /// The node of each site, by site index.
    pub(crate) node_of: Vec<usize>,
}

impl Layout {
    /// One node per site (the default output).
    pub(crate) fn per_site(net: &Network) -> Self {
        Self {
            nodes: (0..net.len())
                .map(|i| NodeDef {
                    head: i,
                    sites: vec![i],
                })
                .collect(),
            node_of: (0..net.len()).collect(),
        }
    }

    /// Region mode: villages with a township are held by the township's node.
    pub(crate) fn region(net: &Network) -> Self {
        let held_by = |i: usize| match net.tier(i) {
            Tier::Village => net.township_of(i),
            _ => None,
        };
        let mut nodes: Vec<NodeDef> = Vec::new();
        let mut node_of = vec![usize::MAX; net.len()];
        for (i, node) in node_of.iter_mut().enumerate() {
            if held_by(i).is_none() {
                *node = nodes.len();
                nodes.push(NodeDef {
                    head: i,
                    sites: vec![i],
                });
            }
        }
        for i in 0..net.len() {
            if let Some(t) = held_by(i) {
                let k = node_of[t];
                node_of[i] = k;
                nodes[k].sites.push(i);
            }
        }
        Self { nodes, node_of }
    }
}

/// One org unit of `region.toml`: the area whose institution is site `site`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unit {
    /// The institution (site index) whose records the unit stands for.
    pub(crate) site: usize,
    /// Administrative code (`3701`, `370101`, `370101001`, `370101001001`).
    pub(crate) code: String,
    pub(crate) name_zh: String,
    pub(crate) name_en: String,
    /// The unit of the level above (an index into [`Tree::units`]); none for
    /// the city.
    pub(crate) parent: Option<usize>,
    /// Privately run (some village clinics).
    pub(crate) private: bool,
}

/// The organisation tree: one unit per site, in network order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tree {
    pub(crate) units: Vec<Unit>,
}

/// The city's code (a prefecture-level code) and names.
const CITY_CODE: &str = "3701";
const CITY_ZH: &str = "示范市";
const CITY_EN: &str = "Demo City";

/// The most county hospitals region mode can code (two digits).
pub(crate) const MAX_COUNTIES: usize = 99;
/// The most townships per county, and villages per township (three digits).
const MAX_CHILDREN: usize = 999;

/// First and second syllables of place names: (characters, pinyin).
const FIRST: [(&str, &str); 25] = [
    ("青", "Qing"),
    ("石", "Shi"),
    ("河", "He"),
    ("白", "Bai"),
    ("龙", "Long"),
    ("长", "Chang"),
    ("新", "Xin"),
    ("东", "Dong"),
    ("安", "An"),
    ("平", "Ping"),
    ("永", "Yong"),
    ("桃", "Tao"),
    ("双", "Shuang"),
    ("金", "Jin"),
    ("柳", "Liu"),
    ("松", "Song"),
    ("高", "Gao"),
    ("大", "Da"),
    ("凤", "Feng"),
    ("杨", "Yang"),
    ("南", "Nan"),
    ("西", "Xi"),
    ("北", "Bei"),
    ("红", "Hong"),
    ("黄", "Huang"),
];
const SECOND: [(&str, &str); 20] = [
    ("山", "shan"),
    ("桥", "qiao"),
    ("口", "kou"),
    ("沙", "sha"),
    ("泉", "quan"),
    ("乐", "le"),
    ("田", "tian"),
    ("坪", "ping"),
    ("溪", "xi"),
    ("林", "lin"),
    ("湖", "hu"),
    ("岭", "ling"),
    ("塘", "tang"),
    ("坝", "ba"),
    ("源", "yuan"),
    ("江", "jiang"),
    ("冲", "chong"),
    ("湾", "wan"),
    ("岗", "gang"),
    ("铺", "pu"),
];

/// The `k`-th place name (0-based): distinct for the first 500, then with a
/// number after them.
fn place_name(k: usize) -> (String, String) {
    let n = FIRST.len() * SECOND.len();
    // A stride coprime with n spreads neighbouring units over the syllables.
    let i = (k % n) * 137 % n;
    let (f, s) = (FIRST[i % FIRST.len()], SECOND[i / FIRST.len()]);
    let round = k / n;
    if round == 0 {
        (format!("{}{}", f.0, s.0), format!("{}{}", f.1, s.1))
    } else {
        (
            format!("{}{}{}", f.0, s.0, round + 1),
            format!("{}{} {}", f.1, s.1, round + 1),
        )
    }
}

/// The level id of a tier's units.
pub(crate) fn level_id(tier: Tier) -> &'static str {
    match tier {
        Tier::Tertiary => "city",
        Tier::County => "county",
        Tier::Township => "township",
        Tier::Village => "village",
    }
}

impl Tree {
    /// The tree of `net`; `seed` picks which village clinics are private.
    /// Fails, saying why, when a code would need more digits than it has.
    pub(crate) fn new(net: &Network, seed: u64) -> Result<Self, String> {
        let mut units: Vec<Unit> = Vec::with_capacity(net.len());
        // Children numbered so far, by parent unit.
        let mut children = vec![0usize; net.len()];
        let mut names = 0usize;
        for i in 0..net.len() {
            let tier = net.tier(i);
            let parent = match tier {
                Tier::Tertiary => None,
                Tier::County => Some(0),
                Tier::Township => Some(net.county_of(i).unwrap_or(0)),
                Tier::Village => Some(net.township_of(i).unwrap_or(0)),
            };
            let code = match parent {
                None => CITY_CODE.to_string(),
                Some(p) => {
                    children[p] += 1;
                    let k = children[p];
                    let (digits, max) = match tier {
                        Tier::County => (2, MAX_COUNTIES),
                        _ => (3, MAX_CHILDREN),
                    };
                    if k > max {
                        return Err(match tier {
                            Tier::County => format!(
                                "sites = {}: region mode codes counties with two digits (3701CC), so it takes at most {MAX_COUNTIES} county hospitals, which is at most 497 sites",
                                net.len()
                            ),
                            _ => format!(
                                "sites = {}: region mode codes townships and villages with three digits, so it takes at most {MAX_CHILDREN} under one parent: use fewer sites",
                                net.len()
                            ),
                        });
                    }
                    // A unit whose parent is not the level right above it
                    // (a village with no township) gets zeros for the
                    // missing levels.
                    let parent_code = &units[p].code;
                    let missing = match (net.tier(p), tier) {
                        (Tier::Tertiary, Tier::Township) => "00",
                        (Tier::Tertiary, Tier::Village) => "00000",
                        (Tier::County, Tier::Village) => "000",
                        _ => "",
                    };
                    format!("{parent_code}{missing}{k:0digits$}")
                }
            };
            let (name_zh, name_en) = match tier {
                Tier::Tertiary => (CITY_ZH.to_string(), CITY_EN.to_string()),
                _ => {
                    let (zh, en) = place_name(names);
                    names += 1;
                    match tier {
                        Tier::County => (format!("{zh}县"), format!("{en} County")),
                        Tier::Township => (format!("{zh}镇"), format!("{en} Town")),
                        _ => (format!("{zh}村"), format!("{en} Village")),
                    }
                }
            };
            let private = tier == Tier::Village && mix(seed ^ 0x0A_11ED, i as u64) % 100 < 30;
            units.push(Unit {
                site: i,
                code,
                name_zh,
                name_en,
                parent,
                private,
            });
        }
        Ok(Self { units })
    }

    /// `region.toml`.
    pub(crate) fn to_toml(&self, net: &Network, seed: u64) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "# The organisation tree of a synthetic region, for supervision statistics;\n\
             # written by confer-synth (seed {seed}). No real place or institution is in it.\n\
             #\n\
             # Levels top to bottom, two group sets (institution tier, ownership), and one\n\
             # unit per institution: the city unit holds the tertiary hospital's records,\n\
             # each county unit its county hospital's, each township unit its township\n\
             # health centre's, each village unit its village clinic's. Codes follow\n\
             # Chinese administrative codes: city 3701, county 3701CC, township 3701CCTTT,\n\
             # village 3701CCTTTVVV. Each node's node.toml lists under [supervision] the\n\
             # units whose records it holds, with their OMOP care_site_ids."
        );
        for (id, zh, en) in [
            ("city", "市", "City"),
            ("county", "县", "County"),
            ("township", "乡镇", "Township"),
            ("village", "村", "Village"),
        ] {
            let _ = writeln!(
                t,
                "\n[[level]]\nid = \"{id}\"\nname_zh = \"{zh}\"\nname_en = \"{en}\""
            );
        }
        type Named = (&'static str, &'static str, &'static str);
        let sets: [(Named, &[Named]); 2] = [
            (
                ("tier", "机构类别", "Institution tier"),
                &[
                    ("tertiary", "三级医院", "Tertiary hospital"),
                    ("county", "县级医院", "County hospital"),
                    ("township", "乡镇卫生院", "Township health centre"),
                    ("village", "村卫生室", "Village clinic"),
                ],
            ),
            (
                ("ownership", "所有制", "Ownership"),
                &[("public", "公立", "Public"), ("private", "民营", "Private")],
            ),
        ];
        for ((id, zh, en), options) in sets {
            let _ = writeln!(
                t,
                "\n[[group_set]]\nid = \"{id}\"\nname_zh = \"{zh}\"\nname_en = \"{en}\""
            );
            for (id, zh, en) in options {
                let _ = writeln!(
                    t,
                    "[[group_set.option]]\nid = \"{id}\"\nname_zh = \"{zh}\"\nname_en = \"{en}\""
                );
            }
        }
        for u in &self.units {
            let site = &net.sites[u.site];
            let _ = writeln!(
                t,
                "\n# {} ({}, care_site_id {})\n[[unit]]\ncode = \"{}\"\nname_zh = \"{}\"\nname_en = \"{}\"\nlevel = \"{}\"",
                site.name,
                site.tier.description(),
                site.care_site_id,
                u.code,
                u.name_zh,
                u.name_en,
                level_id(site.tier)
            );
            if let Some(p) = u.parent {
                let _ = writeln!(t, "parent = \"{}\"", self.units[p].code);
            }
            let _ = writeln!(
                t,
                "groups = {{ tier = \"{}\", ownership = \"{}\" }}",
                site.tier.as_str(),
                if u.private { "private" } else { "public" }
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn villages_join_their_townships_node() {
        let net = Network::new(12, 7);
        let layout = Layout::region(&net);
        let names = |n: &NodeDef| -> Vec<&str> {
            n.sites
                .iter()
                .map(|&i| net.sites[i].name.as_str())
                .collect()
        };
        let nodes: Vec<Vec<&str>> = layout.nodes.iter().map(names).collect();
        // 12 sites: tertiary, 2 counties, 3 townships, 6 villages.
        assert_eq!(
            nodes,
            [
                vec!["tertiary-1"],
                vec!["county-1"],
                vec!["county-2"],
                vec!["township-1", "village-1", "village-4"],
                vec!["township-2", "village-2", "village-5"],
                vec!["township-3", "village-3", "village-6"],
            ]
        );
        for (i, &k) in layout.node_of.iter().enumerate() {
            assert!(layout.nodes[k].sites.contains(&i));
        }
        assert_eq!(Layout::per_site(&net).nodes.len(), 12);
        // A network without villages: one node per site either way.
        let small = Network::new(3, 1);
        assert_eq!(Layout::region(&small), Layout::per_site(&small));
    }

    #[test]
    fn codes_nest_and_names_differ() {
        let net = Network::new(12, 7);
        let tree = Tree::new(&net, 7).unwrap();
        let codes: Vec<&str> = tree.units.iter().map(|u| u.code.as_str()).collect();
        assert_eq!(
            codes,
            [
                "3701",
                "370101",
                "370102",
                "370101001",
                "370102001",
                "370101002",
                "370101001001",
                "370102001001",
                "370101002001",
                "370101001002",
                "370102001002",
                "370101002002",
            ]
        );
        for u in &tree.units {
            if let Some(p) = u.parent {
                assert!(u.code.starts_with(&tree.units[p].code));
            }
        }
        let mut en: Vec<&str> = tree.units.iter().map(|u| u.name_en.as_str()).collect();
        en.sort_unstable();
        en.dedup();
        assert_eq!(en.len(), 12);
        let distinct: std::collections::HashSet<String> =
            (0..500).map(|k| place_name(k).1).collect();
        assert_eq!(distinct.len(), 500);
        assert_ne!(place_name(0), place_name(500));
        assert!(Tree::new(&Network::new(497, 1), 1).is_ok());
        let err = Tree::new(&Network::new(498, 1), 1).unwrap_err();
        assert!(err.contains("at most 99 county hospitals"), "{err}");
    }
}
