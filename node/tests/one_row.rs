//! One row per person, checked when the node starts, is trusted by queries
//! only while the table's files are the ones checked: a file rewritten
//! since makes every query enforce it again.

use confer_node::NodeConfig;
use confer_node::service::NodeState;
use confer_protocol::signing::Identity;

#[tokio::test]
async fn queries_trust_the_start_check_only_while_the_files_are_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let person = dir.path().join("person.csv");
    let header = "person_id,gender_concept_id,year_of_birth,race_concept_id,ethnicity_concept_id\n";
    std::fs::write(
        &person,
        format!("{header}1,8507,1970,0,0\n2,8532,1980,0,0\n"),
    )
    .expect("csv");
    std::fs::write(dir.path().join("obs.csv"), "person_id,code\n1,5\n1,6\n").expect("csv");
    // A table in a directory of files, one row per person.
    let extract = dir.path().join("extract");
    std::fs::create_dir_all(&extract).expect("dir");
    std::fs::write(extract.join("a.csv"), "pid,x\n1,5\n2,6\n").expect("csv");
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ncoordinator_key = \"{}\"\n\
             [policy]\napproval = \"auto\"\n\
             [tables.person]\npath = \"person.csv\"\nprivacy_unit = \"person_id\"\n\
             [tables.obs]\npath = \"obs.csv\"\nprivacy_unit = \"person_id\"\n\
             [tables.extract]\npath = \"extract\"\nformat = \"csv\"\nprivacy_unit = \"pid\"\none_row_per_unit = true\n",
            Identity::generate().expect("key").public_hex()
        ),
    )
    .expect("node.toml");
    let config = NodeConfig::load(&path).expect("config");
    let state = NodeState::open(&config).await.expect("state");
    // Checked at start: person (one row per person by default) and
    // extract (declared), not obs.
    assert_eq!(
        state.verified_one_row().into_iter().collect::<Vec<_>>(),
        vec!["extract".to_string(), "person".to_string()]
    );
    // A file added anywhere under the directory (DataFusion lists it
    // recursively) is a change.
    std::fs::create_dir_all(extract.join("more")).expect("dir");
    std::fs::write(extract.join("more/b.csv"), "pid,x\n1,7\n").expect("csv");
    assert_eq!(
        state.verified_one_row().into_iter().collect::<Vec<_>>(),
        vec!["person".to_string()]
    );
    // Rewritten in place with the same size and its modification time
    // set back (as `cp -p` or `rsync -a` do): the change time still shows.
    let stamp = std::fs::metadata(&person)
        .expect("meta")
        .modified()
        .expect("mtime");
    std::fs::write(
        &person,
        format!("{header}1,8507,1970,0,0\n1,8532,1980,0,0\n"),
    )
    .expect("csv");
    std::fs::File::options()
        .write(true)
        .open(&person)
        .expect("open")
        .set_modified(stamp)
        .expect("set mtime");
    assert_eq!(
        std::fs::metadata(&person)
            .expect("meta")
            .modified()
            .expect("mtime"),
        stamp
    );
    assert!(state.verified_one_row().is_empty());
    // The file rewritten with a person twice: no longer trusted.
    std::fs::write(
        &person,
        format!("{header}1,8507,1970,0,0\n2,8532,1980,0,0\n2,8532,1980,0,0\n"),
    )
    .expect("csv");
    assert!(state.verified_one_row().is_empty());
}
