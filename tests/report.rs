//! Tests of `medcnn::metrics` (CSV round trip, confusion-matrix statistics) and
//! `medcnn::report` (every plot writes a readable PNG of the expected size with something
//! drawn on it; empty input is an error).

use std::path::PathBuf;

use medcnn::metrics::{read_metrics_csv, write_metrics_csv, ConfusionMatrix, EpochMetrics};
use medcnn::report::{
    plot_accuracy, plot_bench, plot_confusion, plot_loss, register_font, save_gray_grid, BenchBar, PLOT_SIZE,
};

/// A fresh, empty directory for one test's files, under Cargo's per-target scratch
/// directory (`target/tmp`), so the plots can be looked at after a run.
fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("report-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn epochs(n: usize) -> Vec<EpochMetrics> {
    (1..=n)
        .map(|e| {
            let t = e as f64;
            EpochMetrics {
                epoch: e,
                train_loss: 1.6 / t,
                train_acc: 1.0 - 0.5 / t,
                val_loss: 1.5 / t + 0.02,
                val_acc: 1.0 - 0.45 / t - 0.01,
                lr: 1e-3 * 0.9f64.powi(e as i32),
                seconds: 12.5 + t * 0.1,
                images_per_sec: 3456.7,
            }
        })
        .collect()
}

/// Opens the PNG, checks its size, and that it is not one flat colour. Returns it.
fn check_png(path: &std::path::Path, size: Option<(u32, u32)>) -> image::RgbImage {
    assert!(path.exists(), "{} was not written", path.display());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    assert!(!PathBuf::from(tmp).exists(), "temporary file left behind");
    let img = image::open(path).unwrap_or_else(|e| panic!("{} does not open: {e}", path.display())).to_rgb8();
    if let Some((w, h)) = size {
        assert_eq!(img.dimensions(), (w, h), "{}", path.display());
    }
    let first = *img.get_pixel(0, 0);
    assert!(img.pixels().any(|p| *p != first), "{} is a single colour", path.display());
    img
}

/// Number of dark (text-like) pixels in rows `y0..y1`.
fn dark_pixels(img: &image::RgbImage, y0: u32, y1: u32) -> usize {
    (y0..y1.min(img.height()))
        .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let p = img.get_pixel(x, y);
            p.0.iter().all(|&c| c < 110)
        })
        .count()
}

#[test]
fn csv_round_trip() {
    let dir = out_dir("csv");
    let path = dir.join("sub/metrics.csv");
    let mut rows = epochs(3);
    rows[1].val_loss = f64::NAN;
    rows[2].lr = 1.0e-7 / 3.0;
    write_metrics_csv(&path, &rows).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().next().unwrap(), "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds,images_per_sec");
    assert_eq!(text.lines().count(), 4);

    let back = read_metrics_csv(&path).unwrap();
    assert_eq!(back.len(), rows.len());
    for (a, b) in rows.iter().zip(&back) {
        assert_eq!(a.epoch, b.epoch);
        let pairs = [
            (a.train_loss, b.train_loss),
            (a.train_acc, b.train_acc),
            (a.val_loss, b.val_loss),
            (a.val_acc, b.val_acc),
            (a.lr, b.lr),
            (a.seconds, b.seconds),
            (a.images_per_sec, b.images_per_sec),
        ];
        for (x, y) in pairs {
            // Bit-exact, NaN included.
            assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()), "{x} != {y}");
        }
    }

    // No rows: header only, reads back as empty.
    write_metrics_csv(&path, &[]).unwrap();
    assert!(read_metrics_csv(&path).unwrap().is_empty());

    // Column order does not matter; a bad number is a clear error.
    std::fs::write(
        &path,
        "lr,epoch,train_loss,train_acc,val_loss,val_acc,seconds,images_per_sec\n0.001,7,1,0.5,2,0.25,3,4\n",
    )
    .unwrap();
    let r = read_metrics_csv(&path).unwrap();
    assert_eq!((r[0].epoch, r[0].lr, r[0].val_acc), (7, 0.001, 0.25));
    std::fs::write(&path, "epoch,train_loss\n1,2\n").unwrap();
    assert!(read_metrics_csv(&path).is_err());
    assert!(read_metrics_csv(&dir.join("missing.csv")).is_err());
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn confusion_matrix_numbers() {
    // Three classes, 10 samples:
    //
    //            pred A  pred B  pred C | support
    //   true A      3       1       0   |   4
    //   true B      0       2       2   |   4
    //   true C      1       0       1   |   2
    //   -------------------------------
    //   predicted   4       3       3
    //
    // correct = 3 + 2 + 1 = 6, accuracy = 6/10 = 0.6
    // A: precision 3/4 = 0.75,  recall 3/4 = 0.75, F1 = 0.75
    // B: precision 2/3,         recall 2/4 = 0.5,  F1 = 2*(2/3)(1/2)/(2/3+1/2) = (2/3)/(7/6) = 4/7
    // C: precision 1/3,         recall 1/2,        F1 = 2*(1/3)(1/2)/(1/3+1/2) = (1/3)/(5/6) = 2/5
    // macro: precision (3/4+2/3+1/3)/3 = 7/12, recall (3/4+1/2+1/2)/3 = 7/12,
    //        F1 (3/4+4/7+2/5)/3 = (105+80+56)/140/3 = 241/420
    let mut cm = ConfusionMatrix::new(vec!["A".into(), "B".into(), "C".into()]);
    let pairs = [(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 2), (1, 2), (2, 0), (2, 2)];
    for (t, p) in pairs {
        cm.add(t, p);
    }
    assert_eq!(cm.counts, vec![vec![3, 1, 0], vec![0, 2, 2], vec![1, 0, 1]]);
    assert_eq!(cm.total(), 10);
    assert!(close(cm.accuracy(), 0.6));

    let s = cm.per_class();
    assert_eq!(s.len(), 3);
    assert_eq!(s[1].class, "B");
    let expect = [(0.75, 0.75, 0.75, 4), (2.0 / 3.0, 0.5, 4.0 / 7.0, 4), (1.0 / 3.0, 0.5, 2.0 / 5.0, 2)];
    for (got, (p, r, f, sup)) in s.iter().zip(expect) {
        assert!(close(got.precision, p), "{got:?}");
        assert!(close(got.recall, r), "{got:?}");
        assert!(close(got.f1, f), "{got:?}");
        assert_eq!(got.support, sup);
    }
    let m = cm.macro_avg();
    assert!(close(m.precision, 7.0 / 12.0) && close(m.recall, 7.0 / 12.0));
    assert!(close(m.f1, 241.0 / 420.0), "{m:?}");

    let table = cm.table();
    assert!(table.contains("accuracy 60.00%"), "{table}");
    assert!(table.contains("macro avg"), "{table}");
    assert!(table.contains("0.5714"), "B's F1 4/7 should be in the table:\n{table}");

    // JSON round trip (the run directory stores it).
    let json = serde_json::to_string(&cm).unwrap();
    let back: ConfusionMatrix = serde_json::from_str(&json).unwrap();
    assert_eq!(back.counts, cm.counts);
}

#[test]
fn confusion_matrix_zero_denominators() {
    // Class B is never predicted and never occurs; class C occurs but is never predicted.
    //   true A: 2 -> A;  true C: 1 -> A
    // A: precision 2/3, recall 1; B: all 0 (0/0 -> 0); C: precision 0/0 -> 0, recall 0.
    let mut cm = ConfusionMatrix::new(vec!["A".into(), "B".into(), "C".into()]);
    cm.add_batch(&[0, 0, 2], &[0, 0, 0]);
    for s in cm.per_class() {
        assert!(!s.precision.is_nan() && !s.recall.is_nan() && !s.f1.is_nan(), "{s:?}");
    }
    let s = cm.per_class();
    assert!(close(s[0].precision, 2.0 / 3.0) && close(s[0].recall, 1.0));
    assert_eq!((s[1].precision, s[1].recall, s[1].f1, s[1].support), (0.0, 0.0, 0.0, 0));
    assert_eq!((s[2].precision, s[2].recall, s[2].f1, s[2].support), (0.0, 0.0, 0.0, 1));

    let empty = ConfusionMatrix::new(vec!["A".into(), "B".into()]);
    assert_eq!(empty.accuracy(), 0.0);
    assert!(empty.per_class().iter().all(|s| s.f1 == 0.0));
    assert!(!empty.table().contains("NaN"));
}

#[test]
fn curve_plots_write_pngs() {
    let dir = out_dir("curves");
    for n in [1, 2, 30] {
        let rows = epochs(n);
        let loss = dir.join(format!("loss_{n}.png"));
        let acc = dir.join(format!("acc_{n}.png"));
        plot_loss(&rows, &loss).unwrap();
        plot_accuracy(&rows, &acc).unwrap();
        for p in [&loss, &acc] {
            let img = check_png(p, Some(PLOT_SIZE));
            // The title is text: dark pixels in the top band prove the font renders.
            assert!(dark_pixels(&img, 0, 50) > 50, "no title text in {}", p.display());
        }
    }
}

#[test]
fn curve_plots_skip_nan() {
    let dir = out_dir("nan");
    let mut rows = epochs(5);
    rows[2].val_loss = f64::NAN;
    rows[0].train_acc = f64::NAN;
    rows[4].train_loss = f64::INFINITY;
    plot_loss(&rows, &dir.join("loss.png")).unwrap();
    plot_accuracy(&rows, &dir.join("acc.png")).unwrap();
    check_png(&dir.join("loss.png"), Some(PLOT_SIZE));
    check_png(&dir.join("acc.png"), Some(PLOT_SIZE));

    // Every value NaN: still a plot (axes, title), not a panic.
    let mut all_nan = epochs(2);
    for r in &mut all_nan {
        r.train_loss = f64::NAN;
        r.val_loss = f64::NAN;
        r.train_acc = f64::NAN;
        r.val_acc = f64::NAN;
    }
    plot_loss(&all_nan, &dir.join("loss_nan.png")).unwrap();
    plot_accuracy(&all_nan, &dir.join("acc_nan.png")).unwrap();
    check_png(&dir.join("acc_nan.png"), Some(PLOT_SIZE));
}

#[test]
fn empty_inputs_are_errors() {
    let dir = out_dir("empty");
    let p = dir.join("x.png");
    assert!(plot_loss(&[], &p).is_err());
    assert!(plot_accuracy(&[], &p).is_err());
    assert!(plot_bench("t", &[], &p).is_err());
    assert!(plot_confusion(&ConfusionMatrix::new(vec![]), &p).is_err());
    assert!(save_gray_grid(&[], 3, 3, 4, 2, &p).is_err());
    assert!(save_gray_grid(&[vec![0.0; 8]], 3, 3, 4, 2, &p).is_err(), "wrong length");
    assert!(save_gray_grid(&[vec![0.0; 9]], 3, 3, 0, 2, &p).is_err(), "zero cols");
    assert!(!p.exists());
}

#[test]
fn confusion_plot_writes_png() {
    let dir = out_dir("confusion");
    let classes: Vec<String> =
        ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"].iter().map(|s| s.to_string()).collect();
    let mut cm = ConfusionMatrix::new(classes);
    for t in 0..6 {
        for p in 0..6 {
            let k = if t == p { 950 + 7 * t } else { (t * 3 + p) % 5 };
            for _ in 0..k {
                cm.add(t, p);
            }
        }
    }
    let path = dir.join("confusion.png");
    plot_confusion(&cm, &path).unwrap();
    let img = check_png(&path, None);
    assert!(img.width() >= 600 && img.height() >= 600, "{:?}", img.dimensions());
    assert!(dark_pixels(&img, 0, 45) > 50, "no title text");

    // An empty matrix and a one-class matrix draw too, and many long names fit.
    plot_confusion(&ConfusionMatrix::new(vec!["only".into()]), &dir.join("one.png")).unwrap();
    check_png(&dir.join("one.png"), None);
    let many: Vec<String> = (0..20).map(|i| format!("a rather long class {i}")).collect();
    let mut cm = ConfusionMatrix::new(many);
    cm.add(3, 4);
    plot_confusion(&cm, &dir.join("many.png")).unwrap();
    check_png(&dir.join("many.png"), None);
}

#[test]
fn bench_plot_writes_png() {
    let dir = out_dir("bench");
    let rows = vec![
        BenchBar { label: "conv1 3x3 1->16".into(), forward_ms: 1.25, backward_ms: 2.5 },
        BenchBar { label: "relu1".into(), forward_ms: 0.08, backward_ms: 0.1 },
        BenchBar { label: "maxpool1".into(), forward_ms: 0.3, backward_ms: f64::NAN },
        BenchBar { label: "conv2 3x3 16->32".into(), forward_ms: 4.0, backward_ms: 7.75 },
        BenchBar { label: "linear 1568->6".into(), forward_ms: 0.2, backward_ms: 0.4 },
    ];
    let path = dir.join("bench.png");
    plot_bench("Per-layer time, batch 64 (CPU)", &rows, &path).unwrap();
    let img = check_png(&path, Some((900, 600)));
    assert!(dark_pixels(&img, 0, 50) > 50, "no title text");

    // One row, all zero: no division by zero.
    let one = [BenchBar { label: "x".into(), forward_ms: 0.0, backward_ms: 0.0 }];
    plot_bench("zero", &one, &dir.join("one.png")).unwrap();
    check_png(&dir.join("one.png"), Some((900, 600)));
}

#[test]
fn gray_grid_layout() {
    let dir = out_dir("grid");
    // 5 maps of 3x2, 4 per row, scale 3: 4*9 + 5*2 = 46 wide, 2*6 + 3*2 = 18 high.
    let mut images: Vec<Vec<f32>> = (0..5).map(|k| (0..6).map(|i| (i * (k + 1)) as f32).collect()).collect();
    images[3] = vec![7.0; 6]; // constant -> mid-gray, no division by zero
    images[4][2] = f32::NAN;
    let path = dir.join("grid.png");
    save_gray_grid(&images, 3, 2, 4, 3, &path).unwrap();
    let img = check_png(&path, Some((46, 18)));
    // First tile: min (0) at its top-left pixel is black, max (5) at bottom-right is white.
    assert_eq!(img.get_pixel(2, 2).0, [0, 0, 0]);
    assert_eq!(img.get_pixel(2 + 8, 2 + 5).0, [255, 255, 255]);
    // The fourth tile is constant: mid-gray.
    assert_eq!(img.get_pixel(2 + 3 * 11, 2).0, [128, 128, 128]);
    // The gap between tiles is not gray.
    let gap = img.get_pixel(11, 2).0;
    assert!(!(gap[0] == gap[1] && gap[1] == gap[2]), "{gap:?}");

    // Fewer images than cols: the grid shrinks to fit.
    save_gray_grid(&images[..2], 3, 2, 8, 1, &dir.join("two.png")).unwrap();
    check_png(&dir.join("two.png"), Some((2 * 3 + 3 * 2, 2 + 2 * 2)));

    // A conv1-like bank: 16 filters of 5x5, 8 per row, scale 8 -> 8*40 + 9*2 by 2*40 + 3*2.
    let filters: Vec<Vec<f32>> = (0..16)
        .map(|k| (0..25).map(|i| ((i % 5) as f32 - 2.0) * (k as f32 - 7.5) + ((i / 5) as f32).sin()).collect())
        .collect();
    save_gray_grid(&filters, 5, 5, 8, 8, &dir.join("filters.png")).unwrap();
    check_png(&dir.join("filters.png"), Some((338, 86)));
}

#[test]
fn register_font_is_idempotent() {
    register_font();
    register_font();
}
