//! The model spec on every command path: a network that is not the reference, on another image
//! size and three channels, trained, saved, resumed, evaluated, predicted, explained, inspected
//! and benchmarked from its model file alone; `arch` and `arch --pytorch`; bad specs refused
//! before any data is read; model files written before specs existed still load.

mod common;

use std::path::Path;

use common::{assert_fails, assert_ok, make_dataset, medcnn, TempDir};
use safetensors::SafeTensors;

/// Every layer kind, pair arguments, padding and ceil mode, three channels, 40x40 (the images
/// are 64x64 gray: resized, and repeated into three channels).
const ARCH: &str = "Conv2d(4, 5, stride=2, padding=2) ReLU AvgPool2d(3, stride=2, padding=1, ceil_mode=True) \
                    Conv2d(8, (3, 1), padding=(1, 0)) ReLU MaxPool2d(2, ceil_mode=True) Flatten Linear(16) ReLU \
                    Dropout(p=0.2) Linear";

fn train(data: &Path, out: &Path, extra: &[&str]) -> String {
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["train", "--data", d, "--out", o, "--batch-size", "8", "--threads", "2"];
    args.extend_from_slice(extra);
    assert_ok(&medcnn(&args))
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<usize>)> =
        st.tensors().into_iter().map(|(n, t)| (n.to_string(), t.shape().to_vec())).collect();
    v.sort();
    v
}

fn metadata(path: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default()
}

/// The `(name, shape)` pairs an `arch --pytorch` module declares, read off its `nn.` lines (the
/// state_dict keys of an `nn.Sequential` are `<index>.weight` and `<index>.bias`).
fn declared(module: &str) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let layers: Vec<&str> = module.lines().map(str::trim).filter(|l| l.starts_with("nn.")).collect();
    for (i, l) in layers.iter().enumerate() {
        let args: Vec<&str> = l[l.find('(').unwrap() + 1..l.rfind(')').unwrap()].split(',').map(str::trim).collect();
        let num = |s: &str| -> usize {
            s.trim_start_matches("kernel_size=").trim_matches(|c| c == '(' || c == ')').parse().unwrap()
        };
        if l.starts_with("nn.Conv2d(") {
            let (cin, cout) = (num(args[0]), num(args[1]));
            // kernel_size=K or kernel_size=(KH, KW) (split by the comma above).
            let (kh, kw) =
                if args[2].contains('(') { (num(args[2]), num(args[3])) } else { (num(args[2]), num(args[2])) };
            out.push((format!("{i}.weight"), vec![cout, cin, kh, kw]));
            out.push((format!("{i}.bias"), vec![cout]));
        } else if l.starts_with("nn.Linear(") {
            let (fin, fout) = (num(args[0]), num(args[1]));
            out.push((format!("{i}.weight"), vec![fout, fin]));
            out.push((format!("{i}.bias"), vec![fout]));
        }
    }
    out.sort();
    out
}

#[test]
fn a_written_network_runs_on_every_command_path() {
    let tmp = TempDir::new("spec-cli");
    let data = make_dataset(&tmp.join("data"), 3, 10);
    let out = tmp.join("out");
    let spec = ["--arch", ARCH, "--image-size", "40", "--channels", "3"];
    let mut args = spec.to_vec();
    args.extend(["--epochs", "2"]);
    let log = train(&data, &out, &args);
    assert!(log.contains("on 40x40 RGB images"), "{log}");
    let model = out.join("model.safetensors");
    let ms = model.to_str().unwrap();

    // The model file holds the spec (its canonical text) and the input.
    let meta = metadata(&model);
    let canonical = "Conv2d(4, 5, stride=2, padding=2) ReLU AvgPool2d(3, stride=2, padding=1, ceil_mode=True) \
                     Conv2d(8, (3, 1), padding=(1, 0)) ReLU MaxPool2d(2, ceil_mode=True) Flatten Linear(16) ReLU \
                     Dropout(p=0.2) Linear";
    assert_eq!(meta["arch"], canonical);
    assert_eq!((meta["image_size"].as_str(), meta["channels"].as_str()), ("40", "3"));

    // `arch --pytorch` declares exactly the tensors that were saved.
    let mut arch = vec!["arch", "--classes", "3", "--pytorch"];
    arch.extend_from_slice(&spec);
    let module = assert_ok(&medcnn(&arch));
    assert!(module.contains("import torch") && module.contains("model = nn.Sequential("), "{module}");
    assert_eq!(declared(&module), tensors(&model));
    assert_eq!(tensors(&model).len(), 8);

    // eval, predict, explain, inspect and bench rebuild the network from the file.
    let eval = assert_ok(&medcnn(&["eval", "--model", ms, "--data", data.to_str().unwrap(), "--split", "val"]));
    assert!(eval.contains("val: ") && eval.contains("accuracy"), "{eval}");
    let img = data.join("Beta/img_000.png");
    let pred = assert_ok(&medcnn(&["predict", "--model", ms, "--json", img.to_str().unwrap()]));
    let v: serde_json::Value = serde_json::from_str(&pred).unwrap();
    let total: f64 = v[0]["probabilities"].as_object().unwrap().values().map(|p| p.as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-6, "{pred}");
    assert!(["Alpha", "Beta", "Gamma"].contains(&v[0]["class"].as_str().unwrap()));

    let ex = tmp.join("explain");
    let said = assert_ok(&medcnn(&["explain", "--model", ms, "--out", ex.to_str().unwrap(), img.to_str().unwrap()]));
    assert!(said.contains("Beta_img_000.png"), "{said}");
    let picture = image::open(ex.join("Beta_img_000.png")).unwrap();
    assert!(picture.width() >= 3 * 40 * 4, "three panels of 40x40 at scale 4: {}", picture.width());

    let ins = tmp.join("inspect");
    let said = assert_ok(&medcnn(&[
        "inspect",
        "--model",
        ms,
        "--data",
        data.to_str().unwrap(),
        "--out",
        ins.to_str().unwrap(),
    ]));
    for f in ["filters.png", "feature_maps.png", "features_1.png", "features_4.png", "least_confident.png"] {
        assert!(ins.join(f).is_file(), "inspect did not write {f}:\n{said}");
    }

    let bench = assert_ok(&medcnn(&[
        "bench",
        "--model",
        ms,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--threads",
        "2",
        "--plot",
        tmp.join("b.png").to_str().unwrap(),
    ]));
    assert!(bench.contains(canonical) && bench.contains("on 40x40 RGB images"), "{bench}");
    // Conv2d(8, (3, 1)) ReLU MaxPool2d is one fused row, named after its conv (3).
    for name in ["0 ", "2 ", "3 ", "6 ", "7 ", "10 "] {
        assert!(bench.lines().any(|l| l.starts_with(name)), "bench has no row for layer {name}:\n{bench}");
    }

    // --resume rebuilds the same network from the checkpoint and continues.
    let log = train(&data, &out, &["--epochs", "3", "--resume"]);
    assert!(log.contains("epoch   3/3"), "{log}");
    assert_eq!(metadata(&out.join("checkpoint.safetensors"))["config"].contains("\"image_size\":40"), true);
}

#[test]
fn a_spec_file_is_read_once_and_stored_as_its_layers() {
    let tmp = TempDir::new("spec-file");
    let data = make_dataset(&tmp.join("data"), 2, 6);
    let file = tmp.join("net.txt");
    std::fs::write(&file, "# a tiny net\nConv2d(4, 3, stride=2)   # 31x31\nReLU\nMaxPool2d(2)\nFlatten\nLinear\n")
        .unwrap();
    let arch = format!("@{}", file.display());
    let out = tmp.join("out");
    train(&data, &out, &["--arch", &arch, "--epochs", "1", "--image-size", "32"]);
    std::fs::remove_file(&file).unwrap();
    let meta = metadata(&out.join("model.safetensors"));
    assert_eq!(meta["arch"], "Conv2d(4, 3, stride=2) ReLU MaxPool2d(2) Flatten Linear");
    // The file is gone: the model and the checkpoint do not need it.
    let img = data.join("Alpha/img_000.png");
    assert_ok(&medcnn(&["predict", "--model", out.join("model.safetensors").to_str().unwrap(), img.to_str().unwrap()]));
    train(&data, &out, &["--epochs", "2", "--resume"]);
}

#[test]
fn bad_specs_are_refused_before_any_data_is_read() {
    let tmp = TempDir::new("spec-bad");
    let out = tmp.join("out");
    let o = out.to_str().unwrap();
    // The data folder does not exist: an error about it would mean the spec was checked too late.
    let run = |extra: &[&str]| {
        let mut a = vec!["train", "--data", "/nonexistent/medcnn-data", "--out", o];
        a.extend_from_slice(extra);
        medcnn(&a)
    };
    let cases: [(&[&str], &[&str]); 10] = [
        (&["--arch", "Conv2d(8, 3) Relu Flatten Linear"], &["layer 2 `Relu`", "unknown layer"]),
        (&["--arch", "Conv2d(8, 3, groups=2) Flatten Linear"], &["layer 1", "unknown argument `groups`"]),
        (&["--arch", "Conv2d(0, 3) Flatten Linear"], &["out_channels must be a positive integer, got 0"]),
        (
            &["--arch", "Conv2d(8, 3) MaxPool2d(63) Flatten Linear"],
            &["layer 2 `MaxPool2d(63)`", "input 8x62x62", "larger than its padded input 62x62"],
        ),
        (&["--arch", "Conv2d(8, 3) Linear"], &["layer 2 `Linear`", "put Flatten before it"]),
        (&["--arch", "Conv2d(8, 3) ReLU"], &["layer 2 `ReLU`", "last layer must be a Linear"]),
        (&["--arch", "@/nonexistent/net.txt"], &["/nonexistent/net.txt", "cannot read"]),
        (&["--arch", "Conv2d(8, 3) Flatten Linear", "--dropout", "0.2"], &["--dropout applies to --arch reference"]),
        (&["--image-size", "0"], &["--image-size must be between 1 and"]),
        (&["--channels", "2"], &["--channels must be 1 (gray) or 3 (RGB), got 2"]),
    ];
    for (extra, needles) in cases {
        let stderr = assert_fails(&run(extra), needles);
        assert!(!stderr.contains("nonexistent/medcnn-data"), "{extra:?} read the data first:\n{stderr}");
    }
    // The reference cannot take 16x16 through four conv blocks (16 -> 14 -> 7 -> 5 -> 2): which
    // layer, and what it got.
    assert_fails(&run(&["--image-size", "16"]), &["layer 7 `Conv2d(128, 3)`", "input 64x2x2", "kernel 3x3 is larger"]);
    assert!(!out.join("model.safetensors").exists() && !out.join("checkpoint.safetensors").exists());
}

#[test]
fn arch_prints_shapes_parameters_and_flops() {
    let table = assert_ok(&medcnn(&["arch"]));
    assert!(table.contains("classifier.2") && table.contains("421510 parameters"), "{table}");
    assert!(table.contains("conv_block.3   Conv2d(64, 3)"), "{table}");
    let t = assert_ok(&medcnn(&["arch", "--image-size", "128", "--channels", "3", "--classes", "4"]));
    // conv_block.0 on 128x128 RGB: 32 x 126 x 126 outputs, 3*3*3 + 1 = 28 parameters each.
    assert!(t.contains("32x126x126") && t.contains("896"), "{t}");
    assert!(t.contains("Linear(4)"), "{t}");
    // 2 * 27 * 32 * 126 * 126 = 27,433,728 FLOP.
    assert!(t.contains("27.434"), "{t}");
    let py = assert_ok(&medcnn(&["arch", "--pytorch"]));
    assert!(py.contains("class Reference(nn.Module)") && py.contains("self.conv_block = nn.Sequential("), "{py}");
    assert_fails(&medcnn(&["arch", "--arch", "Flatten"]), &["layer 1 `Flatten`", "last layer must be a Linear"]);
}

#[test]
fn the_gpu_backend_refuses_a_network_it_cannot_run_yet() {
    use medcnn::data::InputShape;
    use medcnn::spec::ModelSpec;
    let custom = ModelSpec::parse("Conv2d(4, 3) Flatten Linear", InputShape::default(), 0.4).unwrap();
    let e = medcnn::backend::cuda_config(&custom, 6).unwrap_err().to_string();
    assert!(e.contains("--device cuda runs only the reference") && e.contains("Conv2d(4, 3) Flatten Linear"), "{e}");
    let big = ModelSpec::reference(InputShape::new(3, 128).unwrap(), 0.4);
    assert!(medcnn::backend::cuda_config(&big, 6).unwrap_err().to_string().contains("128x128 RGB"));
    let cfg = medcnn::backend::cuda_config(&ModelSpec::reference(InputShape::default(), 0.3), 5).unwrap();
    assert_eq!((cfg.num_classes, cfg.dropout), (5, 0.3));
}

/// A model file from before the spec existed (classes and dropout, no `arch`) loads as the
/// reference on 64x64 gray.
#[test]
fn model_files_without_a_spec_load_as_the_reference() {
    use medcnn::model::{reference_model, ModelConfig};
    let tmp = TempDir::new("spec-old");
    let path = tmp.join("old.safetensors");
    let cfg = ModelConfig { num_classes: 3, dropout: 0.25, ..ModelConfig::default() };
    let weights = reference_model::<f32>(&cfg, 4).export_weights();
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("classes".to_string(), r#"["A","B","C"]"#.to_string());
    meta.insert("dropout".to_string(), "0.25".to_string());
    medcnn::checkpoint::save(&path, medcnn::checkpoint::MODEL_FORMAT, &weights, &meta).unwrap();
    let saved = medcnn::model_file::SavedModel::load(&path).unwrap();
    assert!(saved.spec.reference);
    assert_eq!(saved.spec.reference_dropout(), Some(0.25));
    assert_eq!(saved.spec.input, medcnn::data::InputShape { channels: 1, size: 64 });
    assert_eq!(saved.weights, weights);
}

/// The Python that runs the PyTorch checks: `MEDCNN_PYTHON`, else `python3`.
fn python_with_torch() -> Option<String> {
    let py = std::env::var("MEDCNN_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&py)
        .args(["-c", "import torch, safetensors, PIL, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// `arch --pytorch` is a module PyTorch runs: it loads a medcnn model file with
/// `strict=True` and gives medcnn's probabilities for the same image (an RGB image at the
/// model's size, so no resize is involved). Needs torch: skipped (said out loud) without it,
/// a failure when MEDCNN_REQUIRE_TORCH=1.
#[test]
fn pytorch_runs_the_printed_module_on_the_saved_weights() {
    let Some(py) = python_with_torch() else {
        common::skip_unless_required("TORCH", "no Python with torch, safetensors, PIL and numpy (set MEDCNN_PYTHON)");
        return;
    };
    use medcnn::data::InputShape;
    use medcnn::spec::{BuildOptions, ModelSpec};
    let tmp = TempDir::new("spec-torch");
    let input = InputShape::new(3, 24).unwrap();
    let arch = "Conv2d(6, (3, 5), stride=(1, 2), padding=(1, 2)) ReLU MaxPool2d(3, stride=2, padding=1, ceil_mode=True) \
                Conv2d(8, 3, padding=1) ReLU AvgPool2d(2, ceil_mode=True) Flatten Linear(12) ReLU Dropout(p=0.3) Linear";
    let spec = ModelSpec::parse(arch, input, 0.4).unwrap();
    let classes: Vec<String> = ["A", "B", "C", "D"].iter().map(|c| c.to_string()).collect();
    let weights = spec.build::<f32>(4, BuildOptions::default(), 9).unwrap().export_weights();
    let model = tmp.join("model.safetensors");
    medcnn::model_file::SavedModel::save(&model, &classes, &spec, &weights, Default::default()).unwrap();
    let img = tmp.join("x.png");
    image::RgbImage::from_fn(24, 24, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, ((x * y) % 256) as u8]))
        .save(&img)
        .unwrap();
    let pred = assert_ok(&medcnn(&["predict", "--model", model.to_str().unwrap(), "--json", img.to_str().unwrap()]));
    let v: serde_json::Value = serde_json::from_str(&pred).unwrap();
    let ours: Vec<f64> = classes.iter().map(|c| v[0]["probabilities"][c].as_f64().unwrap()).collect();
    let module = tmp.join("net.py");
    let src = assert_ok(&medcnn(&[
        "arch",
        "--arch",
        arch,
        "--image-size",
        "24",
        "--channels",
        "3",
        "--classes",
        "4",
        "--pytorch",
    ]));
    std::fs::write(&module, src).unwrap();
    let script = r#"
import sys, json, numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
scope = {}
exec(open(sys.argv[1]).read(), scope)
model = scope["model"]
model.load_state_dict(load_file(sys.argv[2]), strict=True)
model.eval()
x = np.asarray(Image.open(sys.argv[3]).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
with torch.no_grad():
    p = torch.softmax(model(torch.from_numpy(x)[None]), dim=1)[0]
print(json.dumps([float(v) for v in p]))
"#;
    let out = std::process::Command::new(&py)
        .args(["-c", script, module.to_str().unwrap(), model.to_str().unwrap(), img.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = assert_ok(&out);
    let theirs: Vec<f64> = serde_json::from_str(stdout.trim()).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!((a - b).abs() < 1e-5, "medcnn {ours:?} vs PyTorch {theirs:?}");
    }
}

/// `serve` takes any model file: `/health` says its input, an upload of another size and colour
/// type is resized to it, predicted, and explained (Grad-CAM at the model's size).
#[test]
fn serve_answers_for_a_written_network() {
    use medcnn::data::InputShape;
    use medcnn::spec::{BuildOptions, ModelSpec};
    let tmp = TempDir::new("spec-serve");
    let spec = ModelSpec::parse(
        "Conv2d(4, 3, stride=2, padding=1) ReLU MaxPool2d(2) Conv2d(6, 3, padding=1) ReLU AdaptiveAvgPool2d(1) Flatten Linear",
        InputShape::new(3, 48).unwrap(),
        0.4,
    )
    .unwrap();
    let classes: Vec<String> = ["A", "B", "C"].iter().map(|c| c.to_string()).collect();
    let weights = spec.build::<f32>(3, BuildOptions::default(), 3).unwrap().export_weights();
    let model = tmp.join("model.safetensors");
    medcnn::model_file::SavedModel::save(&model, &classes, &spec, &weights, Default::default()).unwrap();
    let addr: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let srv = medcnn::serve::start(&model, addr, medcnn::backend::Device::Cpu).unwrap();
    let agent = common::http_agent();
    let url = srv.url();
    let health: serde_json::Value =
        serde_json::from_slice(&agent.get(format!("{url}/health")).call().unwrap().into_body().read_to_vec().unwrap())
            .unwrap();
    assert_eq!((health["image_size"].as_u64(), health["channels"].as_u64()), (Some(48), Some(3)), "{health}");
    let png = common::encode(common::class_image(1, 2), image::ImageFormat::Png); // 64x64 gray
    let r = agent.post(format!("{url}/api/predict")).header("Content-Type", "image/png").send(&png[..]).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.into_body().read_to_vec().unwrap()).unwrap();
    assert!(classes.iter().any(|c| v["class"] == c.as_str()), "{v}");
    assert_eq!(v["image"]["resized"], true, "{v}");
    let r =
        agent.post(format!("{url}/api/explain?scale=2")).header("Content-Type", "image/png").send(&png[..]).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let cam = image::load_from_memory(&r.into_body().read_to_vec().unwrap()).unwrap();
    assert_eq!((cam.width(), cam.height()), (96, 96), "Grad-CAM at the model's 48x48, scale 2");
    srv.shutdown();
}
