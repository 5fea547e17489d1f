//! The region's organisation tree (`region.toml`): levels, group sets and
//! org units, checked when the coordinator starts.
//!
//! ```toml
//! [[level]]
//! id = "city"
//! name_zh = "市"
//! name_en = "City"
//!
//! [[group_set]]
//! id = "tier"
//! name_zh = "机构类别"
//! name_en = "Institution tier"
//! [[group_set.option]]
//! id = "tertiary"
//! name_zh = "三级医院"
//! name_en = "Tertiary hospital"
//!
//! [[unit]]
//! code = "3701"
//! name_zh = "示范市"
//! name_en = "Demo City"
//! level = "city"
//! groups = { tier = "tertiary" }
//! ```
//!
//! Every unit but one root names its `parent`; a unit's level is one below
//! its parent's. A unit's own records (those of the institution it stands
//! for, when a node declares it) and its children's make up its total.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};

/// A level of the tree (city, county, township, village...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    /// Identifier used by units.
    pub id: String,
    /// Chinese name.
    pub name_zh: String,
    /// English name.
    pub name_en: String,
}

/// One option of a group set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupOption {
    /// Identifier used by units.
    pub id: String,
    /// Chinese name.
    pub name_zh: String,
    /// English name.
    pub name_en: String,
}

/// A classification of units (institution tier, ownership).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSet {
    /// Identifier used by units' `groups`.
    pub id: String,
    /// Chinese name.
    pub name_zh: String,
    /// English name.
    pub name_en: String,
    /// Its options.
    #[serde(default, rename = "option")]
    pub options: Vec<GroupOption>,
}

/// One org unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgUnit {
    /// Its code (unique).
    pub code: String,
    /// Chinese name.
    pub name_zh: String,
    /// English name.
    pub name_en: String,
    /// Its level's id.
    pub level: String,
    /// Its parent's code; none for the root.
    #[serde(default)]
    pub parent: Option<String>,
    /// Group set id → option id.
    #[serde(default)]
    pub groups: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionFile {
    #[serde(rename = "level")]
    levels: Vec<Level>,
    #[serde(default, rename = "group_set")]
    group_sets: Vec<GroupSet>,
    #[serde(rename = "unit")]
    units: Vec<OrgUnit>,
}

/// The checked tree.
#[derive(Debug, Clone)]
pub struct Region {
    /// Levels, top to bottom.
    pub levels: Vec<Level>,
    /// Group sets.
    pub group_sets: Vec<GroupSet>,
    /// Units, parents before children (depth-first, in file order).
    pub units: Vec<OrgUnit>,
    index: HashMap<String, usize>,
    children: Vec<Vec<usize>>,
    depth: Vec<usize>,
}

fn bad(what: impl Into<String>) -> CoordinatorError {
    CoordinatorError::Config(what.into())
}

impl Region {
    /// Reads and checks a region file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(format!(
                "supervision.region: cannot read {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text).map_err(|e| match e {
            CoordinatorError::Config(m) => bad(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses and checks region text.
    pub fn parse(text: &str) -> Result<Self> {
        let file: RegionFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        Self::new(file.levels, file.group_sets, file.units)
    }

    fn new(levels: Vec<Level>, group_sets: Vec<GroupSet>, units: Vec<OrgUnit>) -> Result<Self> {
        if levels.is_empty() {
            return Err(bad(
                "no [[level]]: list the levels top to bottom (city, county, ...)",
            ));
        }
        let mut level_of = HashMap::new();
        for (i, l) in levels.iter().enumerate() {
            if level_of.insert(l.id.clone(), i).is_some() {
                return Err(bad(format!("level {:?} is listed twice", l.id)));
            }
        }
        for g in &group_sets {
            if group_sets.iter().filter(|h| h.id == g.id).count() > 1 {
                return Err(bad(format!("group set {:?} is listed twice", g.id)));
            }
        }
        let mut index = HashMap::new();
        for (i, u) in units.iter().enumerate() {
            if u.code.trim().is_empty() || u.code.trim() != u.code {
                return Err(bad(format!(
                    "unit {i}: code {:?} is empty or has spaces",
                    u.code
                )));
            }
            if index.insert(u.code.clone(), i).is_some() {
                return Err(bad(format!("unit {} is listed twice", u.code)));
            }
        }
        let mut roots = Vec::new();
        for u in &units {
            let level = *level_of.get(&u.level).ok_or_else(|| {
                bad(format!(
                    "unit {}: level {:?} is not one of the [[level]] ids ({})",
                    u.code,
                    u.level,
                    levels
                        .iter()
                        .map(|l| l.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            match &u.parent {
                None => roots.push(u.code.clone()),
                Some(p) => {
                    let parent = index.get(p).map(|&i| &units[i]).ok_or_else(|| {
                        bad(format!(
                            "unit {}: parent {p:?} is not a unit of the region",
                            u.code
                        ))
                    })?;
                    let parent_level = level_of[&parent.level];
                    if level != parent_level + 1 {
                        return Err(bad(format!(
                            "unit {} is at level {} but its parent {} is at level {}: a unit is one level \
                             below its parent",
                            u.code, u.level, parent.code, parent.level
                        )));
                    }
                }
            }
            for (set, option) in &u.groups {
                let g = group_sets.iter().find(|g| &g.id == set).ok_or_else(|| {
                    bad(format!(
                        "unit {}: group set {set:?} is not declared in [[group_set]]",
                        u.code
                    ))
                })?;
                if !g.options.iter().any(|o| &o.id == option) {
                    return Err(bad(format!(
                        "unit {}: {set} = {option:?} is not an option of group set {set}",
                        u.code
                    )));
                }
            }
        }
        let root = match roots.as_slice() {
            [r] => r.clone(),
            [] => return Err(bad("no root unit (a unit without parent)")),
            many => {
                return Err(bad(format!(
                    "the tree has {} roots ({}): give every unit but one a parent",
                    many.len(),
                    many.join(", ")
                )));
            }
        };
        if level_of[&units[index[&root]].level] != 0 {
            return Err(bad(format!(
                "the root unit {root} must be at the top level {}",
                levels[0].id
            )));
        }
        // Parents before children; a cycle leaves units unreached.
        let mut kids: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, u) in units.iter().enumerate() {
            if let Some(p) = &u.parent {
                kids.entry(p.as_str()).or_default().push(i);
            }
        }
        let mut order = Vec::with_capacity(units.len());
        let mut stack = vec![index[&root]];
        while let Some(i) = stack.pop() {
            order.push(i);
            if let Some(k) = kids.get(units[i].code.as_str()) {
                stack.extend(k.iter().rev());
            }
        }
        if order.len() != units.len() {
            return Err(bad(
                "some units are not under the root (their parents form a cycle)",
            ));
        }
        let units: Vec<OrgUnit> = order.iter().map(|&i| units[i].clone()).collect();
        let index: HashMap<String, usize> = units
            .iter()
            .enumerate()
            .map(|(i, u)| (u.code.clone(), i))
            .collect();
        let mut children = vec![Vec::new(); units.len()];
        let mut depth = vec![0; units.len()];
        for (i, u) in units.iter().enumerate() {
            depth[i] = level_of[&u.level];
            if let Some(p) = &u.parent {
                children[index[p]].push(i);
            }
        }
        Ok(Self {
            levels,
            group_sets,
            units,
            index,
            children,
            depth,
        })
    }

    /// The position of unit `code` in [`Self::units`].
    pub fn position(&self, code: &str) -> Option<usize> {
        self.index.get(code).copied()
    }

    /// The children of unit `i`.
    pub fn children(&self, i: usize) -> &[usize] {
        &self.children[i]
    }

    /// The level (0 = top) of unit `i`.
    pub fn depth(&self, i: usize) -> usize {
        self.depth[i]
    }

    /// The codes from the root down to unit `i`, joined by `/`.
    pub fn path(&self, i: usize) -> String {
        let mut codes = vec![self.units[i].code.as_str()];
        let mut at = i;
        while let Some(p) = &self.units[at].parent {
            at = self.index[p];
            codes.push(self.units[at].code.as_str());
        }
        codes.reverse();
        codes.join("/")
    }
}

/// Which node holds which units' records: checked against the tree and
/// against each other.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Holdings {
    /// Node → (unit code → care sites).
    pub nodes: BTreeMap<String, BTreeMap<String, Vec<i64>>>,
    /// Nodes that did not answer when asked, and why (their units are
    /// those they declared last, if any).
    #[serde(skip)]
    pub unreachable: HashMap<String, String>,
}

impl Holdings {
    /// Checks that every unit a node declares is in the tree and that no
    /// unit or care site is declared by two nodes.
    pub fn check(&self, region: &Region) -> Result<()> {
        let mut unit_at: BTreeMap<&str, &str> = BTreeMap::new();
        let mut site_at: BTreeMap<i64, (&str, &str)> = BTreeMap::new();
        for (node, units) in &self.nodes {
            for (code, sites) in units {
                if region.position(code).is_none() {
                    return Err(bad(format!(
                        "node {node} declares org unit {code:?} in its [supervision] units, which is not in \
                         the region's tree: fix the code in the node's node.toml, or add the unit to region.toml"
                    )));
                }
                if let Some(other) = unit_at.insert(code, node) {
                    return Err(bad(format!(
                        "org unit {code} is declared by both node {other} and node {node}: a unit's records \
                         are held by one node (fix [supervision] units in one of them)"
                    )));
                }
                for s in sites {
                    if let Some((other, other_code)) = site_at.insert(*s, (node, code)) {
                        return Err(bad(format!(
                            "care_site_id {s} is declared by node {other} (unit {other_code}) and by node \
                             {node} (unit {code}): the nodes' units overlap"
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The node holding unit `code`'s records, if any.
    pub fn holder(&self, code: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|(_, u)| u.contains_key(code))
            .map(|(n, _)| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: &str = r#"
[[level]]
id = "city"
name_zh = "市"
name_en = "City"
[[level]]
id = "county"
name_zh = "县"
name_en = "County"

[[group_set]]
id = "tier"
name_zh = "机构类别"
name_en = "Tier"
[[group_set.option]]
id = "county"
name_zh = "县医院"
name_en = "County hospital"

[[unit]]
code = "c2"
name_zh = "二县"
name_en = "County 2"
level = "county"
parent = "root"
groups = { tier = "county" }

[[unit]]
code = "root"
name_zh = "市"
name_en = "City"
level = "city"

[[unit]]
code = "c1"
name_zh = "一县"
name_en = "County 1"
level = "county"
parent = "root"
"#;

    #[test]
    fn a_tree_is_ordered_parents_first() {
        let r = Region::parse(TREE).expect("tree");
        assert_eq!(r.units[0].code, "root");
        assert_eq!(r.children(0).len(), 2);
        assert_eq!(r.path(r.position("c1").expect("c1")), "root/c1");
        assert_eq!(r.depth(r.position("c2").expect("c2")), 1);
    }

    #[test]
    fn bad_trees_name_the_unit() {
        let cases = [
            (
                TREE.replace("parent = \"root\"\ngroups", "parent = \"nowhere\"\ngroups"),
                "parent \"nowhere\"",
            ),
            (
                TREE.replace("tier = \"county\"", "tier = \"village\""),
                "not an option",
            ),
            (
                TREE.replace("code = \"c1\"", "code = \"c2\""),
                "listed twice",
            ),
            (
                TREE.replace(
                    "name_en = \"County 1\"\nlevel = \"county\"",
                    "name_en = \"County 1\"\nlevel = \"city\"",
                ),
                "one level",
            ),
        ];
        for (text, want) in cases {
            let e = Region::parse(&text).expect_err("refused").to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn holdings_are_checked() {
        let r = Region::parse(TREE).expect("tree");
        let mut h = Holdings::default();
        h.nodes
            .insert("a".into(), BTreeMap::from([("c1".to_string(), vec![1])]));
        h.nodes
            .insert("b".into(), BTreeMap::from([("c2".to_string(), vec![2])]));
        h.check(&r).expect("fine");
        assert_eq!(h.holder("c2"), Some("b"));
        h.nodes
            .insert("c".into(), BTreeMap::from([("c9".to_string(), vec![3])]));
        assert!(
            h.check(&r)
                .unwrap_err()
                .to_string()
                .contains("not in the region's tree")
        );
        h.nodes
            .insert("c".into(), BTreeMap::from([("c1".to_string(), vec![3])]));
        assert!(
            h.check(&r)
                .unwrap_err()
                .to_string()
                .contains("declared by both")
        );
        h.nodes
            .insert("c".into(), BTreeMap::from([("root".to_string(), vec![2])]));
        assert!(h.check(&r).unwrap_err().to_string().contains("overlap"));
    }
}
