//! The real MedNIST archive, end to end through the real
//! binary: a short training (300 images per class, 3 epochs) must pass 90% validation accuracy,
//! and `medcnn eval` of the saved model must reproduce the test accuracy the run reported.
//!
//! Finds the archive with `common::real_archive` (`$MEDCNN_MEDNIST`, `data/`, `../shared/data/`);
//! skipped, saying so, when there is none, and a failure under MEDCNN_REQUIRE_DATA=1 (CI).

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
fn short_real_training_passes_90_percent_and_eval_agrees() {
    let Some(data) = common::real_archive() else { return };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("real-data-run");
    let _ = std::fs::remove_dir_all(&out);
    let bin = env!("CARGO_BIN_EXE_medcnn");
    let run = Command::new(bin)
        .args(["train", "--limit", "300", "--epochs", "3", "--threads", "2", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run medcnn train");
    let log = String::from_utf8_lossy(&run.stdout);
    println!("{log}");
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json")).expect("valid JSON");
    let val = summary["best_val_accuracy"].as_f64().unwrap();
    let test = summary["test_accuracy"].as_f64().unwrap();
    assert!(val > 0.90, "validation accuracy {val} after 3 epochs on 1800 real images");
    assert_eq!(summary["split"]["test"].as_u64(), Some(180));
    for f in ["metrics.csv", "loss.png", "accuracy.png", "confusion.png", "model.safetensors", "checkpoint.safetensors"]
    {
        assert!(out.join(f).exists(), "{f} missing from the output folder");
    }

    // The saved model and its saved split give the same test accuracy again.
    let eval = Command::new(bin)
        .args(["eval", "--split", "test", "--threads", "2", "--model"])
        .arg(out.join("model.safetensors"))
        .arg("--data")
        .arg(&data)
        .output()
        .expect("run medcnn eval");
    let text = String::from_utf8_lossy(&eval.stdout);
    assert!(eval.status.success(), "eval failed: {}", String::from_utf8_lossy(&eval.stderr));
    let want = format!("accuracy {:.2}%", 100.0 * test);
    assert!(text.contains(&want), "eval printed:\n{text}\nexpected it to contain {want}");
}
