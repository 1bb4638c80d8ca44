//! The files a training run leaves behind, read as a stranger would: `model.safetensors` holds
//! exactly the reference PyTorch module's `state_dict` names, shapes and dtype (so PyTorch can
//! load it, see benches/pytorch_load_model.py), the same weights as the checkpoint at the end of
//! the best validation epoch, bit for bit, whichever epoch that was, and `--save-filters` leaves one picture of the first layer per epoch.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::{Dtype, SafeTensors};

/// Three classes of six 64x64 gray PNGs, different enough to learn a little.
fn tiny_dataset(root: &Path) {
    let _ = std::fs::remove_dir_all(root);
    for (c, class) in ["Alpha", "Beta", "Gamma"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..6u32 {
            let img = image::GrayImage::from_fn(64, 64, |x, y| {
                let v = match c {
                    0 => x * 4,
                    1 => y * 4,
                    _ => ((x / 8 + y / 8) % 2) * 200,
                };
                image::Luma([(v + i * 3).min(255) as u8])
            });
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

fn train(data: &Path, out: &Path, epochs: u64) {
    let _ = std::fs::remove_dir_all(out);
    let run = Command::new(env!("CARGO_BIN_EXE_medcnn"))
        .args(["train", "--batch-size", "4", "--threads", "2", "--save-filters", "--epochs", &epochs.to_string()])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));
}

#[test]
fn model_file_has_the_pytorch_state_dict_layout_and_the_checkpoint_weights() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model-file");
    let (data, out) = (tmp.join("data"), tmp.join("out"));
    tiny_dataset(&data);
    train(&data, &out, 2);

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let model = SafeTensors::deserialize(&bytes).unwrap();
    let want: [(&str, &[usize]); 12] = [
        ("conv_block.0.weight", &[32, 1, 3, 3]),
        ("conv_block.0.bias", &[32]),
        ("conv_block.3.weight", &[64, 32, 3, 3]),
        ("conv_block.3.bias", &[64]),
        ("conv_block.6.weight", &[128, 64, 3, 3]),
        ("conv_block.6.bias", &[128]),
        ("conv_block.9.weight", &[256, 128, 3, 3]),
        ("conv_block.9.bias", &[256]),
        ("classifier.0.weight", &[128, 256]),
        ("classifier.0.bias", &[128]),
        ("classifier.2.weight", &[3, 128]),
        ("classifier.2.bias", &[3]),
    ];
    let mut names: Vec<String> = model.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want_names: Vec<String> = want.iter().map(|(n, _)| n.to_string()).collect();
    want_names.sort();
    assert_eq!(names, want_names, "model.safetensors must hold exactly the state_dict names");
    let mut params = 0;
    for (name, shape) in &want {
        let t = model.tensor(name).unwrap();
        assert_eq!(t.shape(), *shape, "{name}");
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        params += shape.iter().product::<usize>();
    }
    // 421,510 parameters for 6 classes; a 3-class model has 3 * (128 + 1) fewer.
    assert_eq!(params, 421_510 - 3 * 129);
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    assert_eq!(meta["classes"], r#"["Alpha","Beta","Gamma"]"#);

    // The model holds the best validation epoch's weights, bit for bit, whichever epoch that was.
    // The model's metadata and summary.json name it; the end-of-epoch checkpoint of a run of
    // exactly that many epochs holds it (a run repeats bit for bit for its seed and threads, so
    // the first `best` epochs of any run are the same).
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let best = summary["best_epoch"].as_u64().expect("summary.json has best_epoch");
    assert_eq!(meta["epoch"], best.to_string(), "the model's metadata names another epoch than summary.json");
    let ck_dir = if best == 2 {
        out.clone()
    } else {
        let again = tmp.join(format!("out-{best}-epochs"));
        train(&data, &again, best);
        again
    };
    let ck_bytes = std::fs::read(ck_dir.join("checkpoint.safetensors")).unwrap();
    let ck = SafeTensors::deserialize(&ck_bytes).unwrap();
    let (_, ck_header) = SafeTensors::read_metadata(&ck_bytes).unwrap();
    let progress: serde_json::Value =
        serde_json::from_str(&ck_header.metadata().as_ref().unwrap()["progress"]).expect("the checkpoint's progress");
    assert_eq!(progress["epoch"].as_u64(), Some(best), "the checkpoint is not the end of epoch {best}");
    assert_eq!(progress["best_epoch"].as_u64(), Some(best));
    for (name, _) in &want {
        assert_eq!(ck.tensor(name).unwrap().data(), model.tensor(name).unwrap().data(), "{name} differs");
    }

    // --save-filters: one picture per epoch, readable.
    for epoch in 1..=2 {
        let p = out.join(format!("filters/epoch_{epoch:03}.png"));
        let img = image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(img.width() > 32 && img.height() > 8, "{} is {}x{}", p.display(), img.width(), img.height());
    }
}
