use std::path::Path;

use confer_synth::{Format, generate};

use crate::common::*;

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn same_seed_same_bytes_other_seed_other_rows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for format in [Format::Parquet, Format::Csv] {
        let run = |name: &str, seed: u64| {
            let out = tmp.path().join(format!("{name}-{format}"));
            generate(&options(&out, 4, 600, seed, format), |_| {}).expect("generate");
            out
        };
        let a = run("a", 11);
        let b = run("b", 11);
        let c = run("c", 12);
        let (fa, fb) = (files(&a), files(&b));
        assert_eq!(
            fa.len(),
            4 * 15 + 1,
            "{format}: 14 tables and node.toml per site, a manifest"
        );
        for ((na, ba), (nb, bb)) in fa.iter().zip(&fb) {
            assert_eq!(na, nb);
            assert!(
                ba == bb,
                "{format}: {na} differs between two runs with the same seed"
            );
        }
        let fc = files(&c);
        let person = |f: &[(String, Vec<u8>)]| {
            f.iter()
                .find(|(n, _)| n == &format!("tertiary-1/person.{}", format.extension()))
                .map(|(_, b)| b.clone())
                .expect("tertiary person table")
        };
        assert_ne!(
            person(&fa),
            person(&fc),
            "{format}: another seed gave the same residents"
        );
    }
    // Row content, not just bytes: the Parquet person tables read back equal.
    let a = read(&tmp.path().join("a-parquet/county-1"), "visit_occurrence");
    let b = read(&tmp.path().join("b-parquet/county-1"), "visit_occurrence");
    assert_eq!(a, b);
    assert!(a.num_rows() > 0);
}
