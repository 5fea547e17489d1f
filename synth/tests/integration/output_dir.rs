use confer_synth::{Format, SynthError, generate};

use crate::common::*;

#[test]
fn a_non_empty_directory_is_refused_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("busy");
    std::fs::create_dir_all(out.join("village-9")).expect("mkdir");
    std::fs::write(out.join("village-9/person.parquet"), b"old").expect("write");
    std::fs::write(out.join("notes.txt"), b"keep me").expect("write");
    std::fs::write(out.join("manifest.json"), b"{}").expect("write");

    let mut o = options(&out, 3, 200, 1, Format::Parquet);
    let err = generate(&o, |_| {}).expect_err("refused");
    assert!(matches!(err, SynthError::OutputNotEmpty { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&out.display().to_string()), "{msg}");
    assert!(msg.contains("force"), "{msg}");
    assert!(!out.join("tertiary-1").exists(), "nothing was written");

    o.force = true;
    let summary = generate(&o, |_| {}).expect("with force");
    assert_eq!(summary.sites.len(), 3);
    assert!(
        !out.join("village-9").exists(),
        "the old site directory is gone"
    );
    assert_eq!(
        std::fs::read(out.join("notes.txt")).expect("kept"),
        b"keep me"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["sites"].as_array().map(Vec::len), Some(3));
    assert_eq!(manifest["residents"], 200);
    assert_eq!(manifest["sites"][0]["name"], "tertiary-1");
    assert_eq!(manifest["sites"][0]["tier"], "tertiary");
    assert!(
        manifest["sites"][0]["rows"]["visit_occurrence"]
            .as_u64()
            .unwrap_or(0)
            > 0
    );
}

#[test]
fn an_empty_or_missing_directory_is_fine_and_a_file_is_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let mut progress = Vec::new();
    let summary = generate(&options(&empty, 2, 3000, 3, Format::Csv), |p| {
        progress.push(p)
    })
    .expect("empty dir");
    assert_eq!(progress.first().map(|p| p.persons_done), Some(0));
    let last = progress.last().copied().expect("progress");
    assert_eq!((last.persons_done, last.persons_total), (3000, 3000));
    assert_eq!(last.rows_written, summary.rows_written);
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].persons_done < w[1].persons_done)
    );

    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let err = generate(&options(&file, 2, 10, 3, Format::Csv), |_| {}).expect_err("a file");
    assert!(matches!(err, SynthError::NotADirectory { .. }), "{err:?}");
    assert!(err.to_string().contains(&file.display().to_string()));
}
