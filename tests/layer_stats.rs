//! `OUT/layer_stats.csv` and `.png` from a real (tiny) training run: the columns, every norm
//! positive and finite, and the update ratio of the first step as Adam's formula gives it.
//!
//! Adam's first step from zero moments moves every weight by lr * g / (|g| + eps), i.e. by
//! lr * sign(g) wherever g != 0. So at step 1 ||dw|| = lr * sqrt(#{g != 0}) exactly, at most
//! lr * sqrt(numel) (a ReLU channel dead for the whole batch has zero gradients), and the
//! ratio is that over ||w0||, w0 the initial weights (`reference_model` from the run's seed).
//! The in-process test checks it exactly, counting the non-zero gradients; the run checks
//! the bound and that most gradients are non-zero.

mod common;

use medcnn::backend::{AdamConfig, Backend, CpuBackend};

use common::{assert_ok, make_dataset, medcnn, quick_train_args, TempDir};
use medcnn::model::{reference_model, ModelConfig};
use medcnn::stats::CSV_HEADER;

#[test]
fn layer_stats_csv_holds_finite_norms_and_adams_first_step() {
    let dir = TempDir::new("layer-stats");
    let data = make_dataset(&dir.join("data"), 3, 12);
    let out = dir.join("out");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = quick_train_args(d, o);
    args.extend(["--epochs", "2", "--stats-every", "2", "--lr", "0.002", "--seed", "7"]);
    assert_ok(&medcnn(&args));

    let text = std::fs::read_to_string(out.join("layer_stats.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.iter().all(|r| r.len() == 10), "a row without 10 fields");
    let steps: std::collections::BTreeSet<u64> = rows.iter().map(|r| r[0].parse().unwrap()).collect();
    // 3 classes x 12 images: 24 or so for training, batch 8: 3 steps per epoch, 6 in all.
    assert_eq!(steps.iter().copied().collect::<Vec<_>>(), vec![1, 2, 4, 6], "statistics steps");

    let model = reference_model::<f32>(&ModelConfig { num_classes: 3, ..ModelConfig::default() }, 7);
    let initial: Vec<(String, f64, usize)> = model
        .named_params()
        .into_iter()
        .map(|(n, p)| {
            let s = p.value.as_slice().unwrap();
            (n, s.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt(), s.len())
        })
        .collect();
    let mut checked = 0;
    for r in &rows {
        let num = |i: usize| r[i].parse::<f64>().unwrap_or_else(|_| panic!("field {i} of {r:?}"));
        match r[2] {
            "param" => {
                let (w, g, ratio) = (num(4), num(5), num(6));
                assert!(w.is_finite() && w > 0.0 && g.is_finite() && g > 0.0, "{r:?}");
                assert!(ratio.is_finite() && ratio > 0.0 && ratio < 1.0, "{r:?}");
                if r[0] == "1" && r[3].ends_with("weight") {
                    let (_, w0, numel) = initial.iter().find(|(n, ..)| n == r[3]).expect("a known parameter");
                    let bound = 0.002 * (*numel as f64).sqrt() / w0;
                    assert!(
                        ratio <= bound * 1.0001 && ratio > 0.5 * bound,
                        "{}: ratio {ratio}, Adam's bound {bound}",
                        r[3]
                    );
                    // The weight moved by exactly that much: | ||w1|| - ||w0|| | <= ||dw||.
                    assert!((w - w0).abs() <= 0.002 * (*numel as f64).sqrt() * 1.001, "{r:?}");
                    checked += 1;
                }
            }
            "output" => {
                let (std, zeros) = (num(8), num(9));
                assert!(num(7).is_finite() && std.is_finite() && std >= 0.0, "{r:?}");
                assert!((0.0..=1.0).contains(&zeros), "{r:?}");
            }
            other => panic!("unknown kind {other}"),
        }
    }
    assert_eq!(checked, 6, "four conv and two linear weights at step 1");
    // The conv blocks' outputs follow ReLUs: some exact zeros, not all.
    let conv0 = rows.iter().find(|r| r[0] == "1" && r[2] == "output" && r[3] == "conv_block.0").unwrap();
    let z: f64 = conv0[9].parse().unwrap();
    assert!(z > 0.0 && z < 0.95, "conv_block.0 zero fraction {z}");

    // A resumed run keeps the rows before its checkpoint and adds its own.
    let mut args = quick_train_args(d, o);
    args.extend(["--epochs", "3", "--stats-every", "2", "--resume"]);
    assert_ok(&medcnn(&args));
    let text = std::fs::read_to_string(out.join("layer_stats.csv")).unwrap();
    let steps: std::collections::BTreeSet<u64> =
        text.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(steps.into_iter().collect::<Vec<_>>(), vec![1, 2, 4, 6, 8], "statistics steps after --resume");

    let png = std::fs::read(out.join("layer_stats.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (1400, 620));
}

#[test]
fn the_first_steps_update_ratio_is_adams_formula() {
    let cfg = ModelConfig { num_classes: 3, ..ModelConfig::default() };
    let lr = 0.003;
    let mut b = CpuBackend::new(&cfg, 11, AdamConfig { lr, weight_decay: 0.0 });
    let w0 = b.export_weights().unwrap();
    let mut rng = common::Lcg(5);
    let n = 4;
    let x: Vec<f32> = (0..n * 64 * 64).map(|_| rng.sym() as f32).collect();
    b.train_step(&x, &[0, 1, 2, 1], lr, 0).unwrap();
    let stats = b.layer_stats(&x, n).unwrap();
    let w1 = b.export_weights().unwrap();
    let grads: Vec<(String, Vec<f32>)> =
        b.model.named_params().into_iter().map(|(name, p)| (name, p.grad.as_slice().unwrap().to_vec())).collect();
    assert_eq!(stats.params.len(), w0.len());
    for ((p, (a, z)), (gname, g)) in stats.params.iter().zip(w0.iter().zip(&w1)).zip(&grads) {
        assert_eq!((&p.name, &p.name), (&a.name, gname));
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let w0n = norm(&mut a.data.iter().map(|&v| v as f64));
        // Adam's formula at t = 1: dw_i = lr * g_i / (|g_i| + eps).
        let formula = norm(&mut g.iter().map(|&g| lr * g as f64 / ((g as f64).abs() + 1e-8)));
        // What the step really did, from the weights before and after.
        let applied = norm(&mut a.data.iter().zip(&z.data).map(|(&u, &v)| (u - v) as f64));
        // At most lr * sqrt(#{g != 0}) (equal when no |g| is near eps).
        let nonzero = g.iter().filter(|&&g| g != 0.0).count();
        assert!(formula <= lr * (nonzero as f64).sqrt() * (1.0 + 1e-9), "{}", p.name);
        assert!(
            (p.update_ratio - formula / w0n).abs() < 1e-4 * p.update_ratio,
            "{}: {} vs {}",
            p.name,
            p.update_ratio,
            formula / w0n
        );
        assert!(
            (applied - formula).abs() < 1e-3 * formula,
            "{}: the step moved {applied}, Adam says {formula}",
            p.name
        );
        assert!((p.grad_norm - norm(&mut g.iter().map(|&v| v as f64))).abs() < 1e-9 + 1e-6 * p.grad_norm);
    }
    // One output row per layer, in order, the conv blocks' after their ReLUs.
    let names: Vec<&str> = stats.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names[0], "conv_block.0");
    assert_eq!(names.last(), Some(&"classifier.2"));
    assert!(stats.outputs[0].zero_frac > 0.0 && stats.outputs[0].mean >= 0.0);
}
