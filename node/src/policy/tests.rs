use super::*;

fn policy(text: &str) -> Result<Policy> {
    #[derive(Deserialize)]
    struct Wrapper {
        policy: PolicyConfig,
    }
    let w: Wrapper = toml::from_str(text).map_err(|e| NodeError::Config(e.to_string()))?;
    Policy::from_config(&w.policy)
}

#[test]
fn listed_and_default_studies() {
    let p = policy(
        r#"
[policy]
approval = "auto"
default_study_budget = { rho = 0.1 }
node_budget = { rho = 10.0 }
[policy.studies.s1]
budget = { epsilon = 1.0, delta = 1e-6 }
researchers = ["alice"]
tables = ["PERSON"]
"#,
    )
    .expect("valid");
    let s1 = p.study("s1").expect("listed");
    assert!(s1.budget_rho > 0.02 && s1.budget_rho < 0.03);
    assert!(s1.allows_researcher("alice") && !s1.allows_researcher("mallory"));
    assert_eq!(
        s1.forbidden_table(&["person".into(), "death".into()]),
        Some("death")
    );
    assert_eq!(s1.budget_delta, 1e-6);
    let other = p.study("other").expect("default budget");
    assert_eq!(other.budget_rho, 0.1);
    assert_eq!(
        other.budget_delta, 0.0,
        "a rho budget without delta allows none"
    );
    assert!(!other.listed);
    let p = policy(
        "[policy]
default_study_budget = { rho = 0.1, delta = 1e-7 }
node_budget = { rho = 1.0 }
",
    )
    .expect("valid");
    assert_eq!(p.study("x").expect("default").budget_delta, 1e-7);
}

#[test]
fn unlisted_studies_are_refused_without_a_default() {
    let p = policy("[policy]\n").expect("valid");
    assert_eq!(p.approval, Approval::Manual);
    assert!(p.study("x").unwrap_err().contains("not admitted"));
}

#[test]
fn errors_name_the_field() {
    let err = policy("[policy.studies.s]\nbudget = { epsilon = -1.0, delta = 1e-6 }\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("policy.studies.s.budget"), "{err}");
    let err = policy("[policy.studies.s]\nbudget = { rho = 1.0, delta = 2.0 }\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("policy.studies.s.budget: delta = 2"), "{err}");
    let err = policy("[policy]\nmax_query_epsilon = 0.0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_query_epsilon"), "{err}");
}
