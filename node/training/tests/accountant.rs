//! The node's privacy accountant against Google's `dp-accounting` (its RDP accountant with its
//! default orders), over noise multipliers, round counts and deltas.

use std::process::Command;

#[test]
fn the_accountant_agrees_with_dp_accounting() {
    let python = std::env::var("FEDCURATE_TRAIN_PYTHON").expect(
        "FEDCURATE_TRAIN_PYTHON: an interpreter with dp-accounting (scripts/test.sh makes target/py-train)",
    );
    let mut cases = Vec::new();
    for z in [0.3, 0.7, 1.0, 1.5, 4.0, 20.0] {
        for rounds in [1u32, 10, 100, 1000] {
            for delta in [1e-5, 1e-8] {
                cases.push((z, rounds, delta));
            }
        }
    }
    let script = r#"
import json, sys
import dp_accounting
from dp_accounting.rdp import rdp_privacy_accountant as rdp
out = []
for z, rounds, delta in json.load(sys.stdin):
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    out.append(acc.get_epsilon(delta))
print(json.dumps(out))
"#;
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        let json = serde_json::to_string(&cases).expect("json");
        stdin.write_all(json.as_bytes()).expect("write");
    }
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success(), "dp-accounting failed");
    let theirs: Vec<f64> = serde_json::from_slice(&out.stdout).expect("epsilons");
    assert_eq!(theirs.len(), cases.len());
    for ((z, rounds, delta), want) in cases.iter().zip(theirs) {
        let (got, _) = fc_training::accountant::epsilon(*z, *rounds, *delta);
        assert!(
            (got - want).abs() <= 1e-9 * want.max(1.0),
            "z {z}, {rounds} rounds, delta {delta}: ours {got}, dp-accounting {want}"
        );
    }
}
