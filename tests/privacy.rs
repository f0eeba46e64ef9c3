//! cohort's privacy accountant against Google's `dp-accounting` (from PyPI): ε of the
//! Poisson-sampled Gaussian mechanism over a grid of noise multipliers, sampling rates,
//! rounds and δ, within 1%.

mod common;

use std::process::Command;

use cohort_coordinator::privacy::Accountant;

#[test]
fn the_accountant_agrees_with_dp_accounting_within_one_percent() {
    let python = common::python_venv("python-dp-accounting", &["dp-accounting==0.6.0"]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dp_accounting_grid.py");
    let out = Command::new(&python).arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grid: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(grid.len(), 200);
    let mut worst = (0.0f64, String::new());
    for point in &grid {
        let f = |k: &str| point[k].as_f64().unwrap();
        let (z, q, steps, delta, want) =
            (f("z"), f("q"), f("steps") as u64, f("delta"), f("epsilon"));
        let mut a = Accountant::default();
        a.compose_gaussian(q, z, steps);
        let got = a.epsilon(delta).0;
        let rel = (got - want).abs() / want.max(1e-12);
        assert!(
            rel <= 0.01,
            "z {z}, q {q}, {steps} rounds, δ {delta}: cohort ε {got}, dp-accounting {want}"
        );
        if rel > worst.0 {
            worst = (
                rel,
                format!("z {z}, q {q}, {steps} rounds, δ {delta}: {got} vs {want}"),
            );
        }
    }
    eprintln!("largest relative difference {:.2e} ({})", worst.0, worst.1);
}
