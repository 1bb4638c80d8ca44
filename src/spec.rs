//! The model spec: the network written down as a list of layers, as PyTorch names them.
//!
//! What it is: one value, [`ModelSpec`] (the input shape and the layer list), that every command
//! reads: it parses from the `--arch` text, prints back to the same text, goes into the model
//! file and the checkpoint, works out every layer's shape (with an error naming the layer when
//! one does not fit), and builds the [`Sequential`] that trains. The reference network is one
//! such value (`--arch reference`, the default), with the reference PyTorch module's names.
//!
//! ```text
//! Conv2d(16, 5, padding=2) ReLU MaxPool2d(2) Conv2d(32, 3) ReLU AdaptiveAvgPool2d(1) Flatten Linear
//! ```
//!
//! Arguments are PyTorch's, with its names and defaults; the input channels of a `Conv2d` and
//! the input features of a `Linear` come from the layer before (as `LazyConv2d`/`LazyLinear`),
//! and a last `Linear` with no size has one output per class. Parameter names follow
//! `nn.Sequential`: layer `i`'s weight is `i.weight` (the reference keeps `conv_block.0.weight`,
//! ..., `classifier.2.bias`), so `medcnn arch --pytorch` prints a module that loads the weights.
//!
//! What it is not: it computes nothing; the layers live in `crate::layers`, and which CPU
//! algorithm a conv block runs is chosen there.

use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::data::InputShape;
pub use crate::layers::{window_out_len, Hw};
use crate::layers::{AvgPool2d, Conv2d, ConvReluPool, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, Relu};
use crate::model::{init_pytorch_default, LayerKind, Sequential};
use crate::tensor::Float;

/// The reference network's dropout probability (`--dropout`'s default).
pub const REFERENCE_DROPOUT: f64 = 0.4;

/// Kernel, stride and padding of a max or average pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolSpec {
    pub kernel: Hw,
    pub stride: Hw,
    pub padding: Hw,
    pub ceil_mode: bool,
}

/// One layer as written (sizes of a lazy `Linear` may be left to the class count).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LayerSpec {
    Conv2d {
        out_channels: usize,
        kernel: Hw,
        stride: Hw,
        padding: Hw,
    },
    MaxPool2d(PoolSpec),
    AvgPool2d(PoolSpec),
    /// `AdaptiveAvgPool2d(1)`: the mean of each channel.
    AdaptiveAvgPool2d,
    Relu,
    Dropout {
        p: f64,
    },
    Flatten,
    /// `out_features: None` is only allowed last: one output per class.
    Linear {
        out_features: Option<usize>,
    },
}

/// The network: what it takes and its layers in order.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub input: InputShape,
    pub layers: Vec<LayerSpec>,
    /// The reference network: parameters named as the reference PyTorch module, and printed
    /// as `reference`.
    pub reference: bool,
}

/// One layer with its shapes worked out (per image, no batch dimension).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInfo {
    /// The name its parameters are saved under (`3` saves `3.weight`, `3.bias`).
    pub name: String,
    /// The layer, with a lazy `Linear`'s size filled in.
    pub spec: LayerSpec,
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    /// Parameter tensors `(suffix, shape)`: `("weight", [32, 1, 3, 3])`, `("bias", [32])`.
    pub params: Vec<(&'static str, Vec<usize>)>,
    /// Forward floating-point operations for one image (a multiply-add is 2; conv and linear
    /// only, as torchinfo counts).
    pub flops: u64,
}

impl LayerInfo {
    pub fn param_count(&self) -> usize {
        self.params.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// How the CPU layers are put together.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BuildOptions {
    /// The training build: Conv + ReLU + MaxPool in a row become one fused `ConvReluPool` (the
    /// fast CPU path), with the same parameters, names and results as the three layers, and
    /// the first layer does not compute the gradient of the images (its backward returns an
    /// empty tensor). A Conv + ReLU that no max pool follows becomes one `Conv2d` with its ReLU
    /// fused in (`Conv2d::relu`). The layer-by-layer build (`false`) is what explain and the
    /// tests read.
    pub fused: bool,
    /// Fused blocks use im2col + GEMM only (no direct or Winograd path): the sums closest to
    /// the GPU's, which the CUDA checks compare against.
    pub gemm_only: bool,
}

impl ModelSpec {
    /// The reference network, layer for layer as the reference PyTorch module:
    ///
    /// ```text
    /// conv_block: Conv2d(32, 3) ReLU MaxPool2d(2)    64x64 -> 62 -> 31
    ///             Conv2d(64, 3) ReLU MaxPool2d(2)    31 -> 29 -> 14
    ///             Conv2d(128, 3) ReLU MaxPool2d(2)   14 -> 12 -> 6
    ///             Conv2d(256, 3) ReLU MaxPool2d(2)    6 -> 4 -> 2
    /// global_pool: AdaptiveAvgPool2d(1), flatten: Flatten
    /// classifier: Linear(128) Dropout(p) Linear   (one output per class)
    /// ```
    pub fn reference(input: InputShape, dropout: f64) -> ModelSpec {
        let mut layers = Vec::new();
        for width in [32, 64, 128, 256] {
            layers.push(LayerSpec::Conv2d {
                out_channels: width,
                kernel: Hw::square(3),
                stride: Hw::square(1),
                padding: Hw::square(0),
            });
            layers.push(LayerSpec::Relu);
            layers.push(LayerSpec::MaxPool2d(PoolSpec::new(Hw::square(2), None, Hw::square(0), false)));
        }
        layers.extend([
            LayerSpec::AdaptiveAvgPool2d,
            LayerSpec::Flatten,
            LayerSpec::Linear { out_features: Some(128) },
            LayerSpec::Dropout { p: dropout },
            LayerSpec::Linear { out_features: None },
        ]);
        ModelSpec { input, layers, reference: true }
    }

    /// Parses `--arch`: `reference`, `@FILE` (one layer per line, `#` comments) or the layers
    /// separated by spaces. `dropout` is the reference's dropout (a written spec has its own).
    /// Errors name the layer (position and text) or the file.
    pub fn parse(arch: &str, input: InputShape, dropout: f64) -> Result<ModelSpec> {
        let arch = arch.trim();
        if arch == "reference" {
            return Ok(ModelSpec::reference(input, dropout));
        }
        if let Some(file) = arch.strip_prefix('@') {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("--arch @{file}: cannot read the file"))?;
            let layers = parse_layers(&text).with_context(|| format!("--arch @{file}"))?;
            return Ok(ModelSpec { input, layers, reference: false });
        }
        let layers = parse_layers(arch).context("--arch")?;
        Ok(ModelSpec { input, layers, reference: false })
    }

    /// The `--arch` text that parses back to this spec: `reference`, or the layers.
    pub fn arch_text(&self) -> String {
        if self.reference {
            return "reference".into();
        }
        self.layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(" ")
    }

    /// The reference's dropout probability, if this is the reference.
    pub fn reference_dropout(&self) -> Option<f64> {
        match (self.reference, self.layers.get(self.layers.len().wrapping_sub(2))) {
            (true, Some(LayerSpec::Dropout { p })) => Some(*p),
            _ => None,
        }
    }

    /// The name of each layer: `conv_block.0`, ... for the reference, `0`, `1`, ... otherwise.
    pub fn layer_names(&self) -> Vec<String> {
        if !self.reference {
            return (0..self.layers.len()).map(|i| i.to_string()).collect();
        }
        let mut names: Vec<String> = (0..12).map(|i| format!("conv_block.{i}")).collect();
        names.extend(["global_pool", "flatten", "classifier.0", "classifier.1", "classifier.2"].map(String::from));
        names
    }

    /// Every layer's shapes, parameters and FLOPs for `classes` outputs, or an error naming the
    /// first layer that does not fit (its position and text) and the shape it got.
    pub fn resolve(&self, classes: usize) -> Result<Vec<LayerInfo>> {
        if classes == 0 {
            bail!("the model needs at least one class");
        }
        let Some(last) = self.layers.last() else { bail!("--arch: the spec has no layers") };
        if !matches!(last, LayerSpec::Linear { .. }) {
            bail!(
                "--arch: layer {} `{last}`: the last layer must be a Linear (it gives one output per class)",
                self.layers.len()
            );
        }
        let names = self.layer_names();
        let mut shape: Vec<usize> = self.input.chw().to_vec();
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, (layer, name)) in self.layers.iter().zip(names).enumerate() {
            let is_last = i + 1 == self.layers.len();
            let info = resolve_layer(layer, &shape, classes, is_last, name)
                .with_context(|| format!("--arch: layer {} `{layer}` (input {})", i + 1, shape_text(&shape)))?;
            shape = info.output.clone();
            out.push(info);
        }
        if shape != [classes] {
            bail!(
                "--arch: layer {} `{last}` gives {} outputs, but there are {classes} classes (write `Linear` without a size to get one per class)",
                self.layers.len(),
                shape_text(&shape)
            );
        }
        Ok(out)
    }

    /// Checks every layer's shape before the class count is known (the last `Linear` without a
    /// size is given two classes): what `train` runs before it reads any data.
    pub fn check(&self) -> Result<()> {
        let classes = match self.layers.last() {
            Some(LayerSpec::Linear { out_features: Some(n) }) => *n,
            _ => 2,
        };
        self.resolve(classes).map(|_| ())
    }

    /// Builds the CPU layers with PyTorch's default initialisation drawn from `seed`.
    pub fn build<T: Float>(&self, classes: usize, opts: BuildOptions, seed: u64) -> Result<Sequential<T>> {
        let infos = self.resolve(classes)?;
        let mut m = Sequential::new();
        let mut dropouts = 0u64;
        let mut i = 0;
        while i < infos.len() {
            let info = &infos[i];
            let name = info.name.clone();
            match info.spec {
                LayerSpec::Conv2d { out_channels, kernel, stride, padding } => {
                    let conv = Conv2d::<T>::new(info.input[0], out_channels, kernel, stride, padding);
                    let pool = match (infos.get(i + 1).map(|l| l.spec), infos.get(i + 2).map(|l| l.spec)) {
                        (Some(LayerSpec::Relu), Some(LayerSpec::MaxPool2d(p))) if opts.fused => Some(max_pool(&p)),
                        _ => None,
                    };
                    match pool {
                        Some(pool) if ConvReluPool::can_fuse(&conv, &pool) => {
                            let mut block = ConvReluPool::new(conv, pool);
                            block.input_grad = i > 0; // nobody needs the gradient of the images
                            (block.direct, block.winograd) = (!opts.gemm_only, !opts.gemm_only);
                            m.push_kind(name, LayerKind::ConvReluPool, block);
                            i += 3;
                            continue;
                        }
                        _ => {
                            let mut conv = conv;
                            // As the fused block above: the training build skips the images'
                            // gradient; the layer-by-layer build (explain's) keeps it.
                            conv.input_grad = i > 0 || !opts.fused;
                            // ... and takes a ReLU that follows into the conv (`Conv2d::relu`).
                            conv.relu = opts.fused && matches!(infos.get(i + 1).map(|l| l.spec), Some(LayerSpec::Relu));
                            let fused_relu = conv.relu;
                            m.push_kind(name, LayerKind::Conv2d, conv);
                            if fused_relu {
                                i += 2;
                                continue;
                            }
                        }
                    }
                }
                LayerSpec::MaxPool2d(p) => m.push_kind(name, LayerKind::MaxPool2d, max_pool(&p)),
                LayerSpec::AvgPool2d(p) => m.push_kind(
                    name,
                    LayerKind::AvgPool2d,
                    AvgPool2d::with_options(p.kernel, p.stride, p.padding, p.ceil_mode),
                ),
                LayerSpec::AdaptiveAvgPool2d => m.push_kind(name, LayerKind::GlobalAvgPool2d, GlobalAvgPool2d::new()),
                LayerSpec::Relu => m.push_kind(name, LayerKind::Relu, Relu::<T>::new()),
                LayerSpec::Dropout { p } => {
                    // The first dropout keeps the reference's stream; later ones get their own.
                    let s = seed ^ 0xD50F_u64 ^ dropouts.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    dropouts += 1;
                    m.push_kind(name, LayerKind::Dropout, Dropout::<T>::new(p, s));
                }
                LayerSpec::Flatten => m.push_kind(name, LayerKind::Flatten, Flatten::new()),
                LayerSpec::Linear { out_features } => {
                    let out = out_features.expect("resolve fills every Linear's size");
                    m.push_kind(name, LayerKind::Linear, Linear::<T>::new(info.input[0], out));
                }
            }
            i += 1;
        }
        m.input = self.input;
        init_pytorch_default(&mut m, seed);
        Ok(m)
    }

    /// The names of the parameter tensors, in order (they do not depend on any shape).
    pub fn param_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (l, name) in self.layers.iter().zip(self.layer_names()) {
            if matches!(l, LayerSpec::Conv2d { .. } | LayerSpec::Linear { .. }) {
                out.push(format!("{name}.weight"));
                out.push(format!("{name}.bias"));
            }
        }
        out
    }

    /// `(name, shape)` of every tensor the model file holds, in order.
    pub fn weight_shapes(&self, classes: usize) -> Result<Vec<(String, Vec<usize>)>> {
        Ok(self
            .resolve(classes)?
            .into_iter()
            .flat_map(|l| {
                let name = l.name;
                l.params.into_iter().map(move |(kind, shape)| (format!("{name}.{kind}"), shape))
            })
            .collect())
    }

    /// The table `medcnn arch` prints: every layer with its output shape, parameters and forward
    /// MFLOP per image, then the totals (as torchinfo's summary).
    pub fn summary(&self, classes: usize) -> Result<String> {
        let infos = self.resolve(classes)?;
        let width = infos.iter().map(|l| l.spec.to_string().len()).max().unwrap_or(0).max(5);
        let mut s = format!("input: {} ({}), {classes} classes\n", self.input, shape_text(&self.input.chw()));
        s += &format!("{:<14} {:<width$} {:<16} {:>10} {:>10}\n", "name", "layer", "output", "params", "MFLOP");
        for l in &infos {
            s += &format!(
                "{:<14} {:<width$} {:<16} {:>10} {:>10.3}\n",
                l.name,
                l.spec.to_string(),
                shape_text(&l.output),
                l.param_count(),
                l.flops as f64 / 1e6
            );
        }
        let params: usize = infos.iter().map(LayerInfo::param_count).sum();
        let flops: u64 = infos.iter().map(|l| l.flops).sum();
        s += &format!(
            "total: {params} parameters ({:.2} MB as f32), {:.3} MFLOP forward per image\n",
            params as f64 * 4.0 / 1e6,
            flops as f64 / 1e6
        );
        Ok(s)
    }

    /// A self-contained Python module defining `model`, whose `state_dict()` keys and shapes are
    /// exactly the tensors medcnn saves for this spec.
    pub fn pytorch_module(&self, classes: usize) -> Result<String> {
        let infos = self.resolve(classes)?;
        let mut s = String::from("# Written by `medcnn arch --pytorch`: the network medcnn trains for this spec.\n");
        s += &format!(
            "# --arch \"{}\" --image-size {} --channels {}, {classes} classes.\n",
            self.arch_text(),
            self.input.size,
            self.input.channels
        );
        s += "# model.load_state_dict(safetensors.torch.load_file(\"model.safetensors\")) gives medcnn's logits\n";
        s += &format!(
            "# for inputs of shape (N, {}, {}, {}) normalised as x / 127.5 - 1.\n",
            self.input.channels, self.input.size, self.input.size
        );
        s += "import torch\nfrom torch import nn\n\n";
        let torch = |l: &LayerInfo| -> String {
            match l.spec {
                LayerSpec::Conv2d { out_channels, kernel, stride, padding } => format!(
                    "nn.Conv2d({}, {out_channels}, kernel_size={}, stride={}, padding={})",
                    l.input[0],
                    py_hw(kernel),
                    py_hw(stride),
                    py_hw(padding)
                ),
                LayerSpec::MaxPool2d(p) => format!(
                    "nn.MaxPool2d(kernel_size={}, stride={}, padding={}, ceil_mode={})",
                    py_hw(p.kernel),
                    py_hw(p.stride),
                    py_hw(p.padding),
                    py_bool(p.ceil_mode)
                ),
                LayerSpec::AvgPool2d(p) => format!(
                    "nn.AvgPool2d(kernel_size={}, stride={}, padding={}, ceil_mode={})",
                    py_hw(p.kernel),
                    py_hw(p.stride),
                    py_hw(p.padding),
                    py_bool(p.ceil_mode)
                ),
                LayerSpec::AdaptiveAvgPool2d => "nn.AdaptiveAvgPool2d(1)".into(),
                LayerSpec::Relu => "nn.ReLU()".into(),
                LayerSpec::Dropout { p } => format!("nn.Dropout(p={p})"),
                LayerSpec::Flatten => "nn.Flatten()".into(),
                LayerSpec::Linear { out_features } => {
                    format!("nn.Linear({}, {})", l.input[0], out_features.unwrap_or(0))
                }
            }
        };
        if self.reference {
            // The reference module's own structure, so the names are conv_block.0 and so on.
            let list = |range: std::ops::Range<usize>| -> String {
                infos[range].iter().map(|l| format!("            {},\n", torch(l))).collect()
            };
            s += "\nclass Reference(nn.Module):\n    def __init__(self):\n        super().__init__()\n";
            s += &format!("        self.conv_block = nn.Sequential(\n{}        )\n", list(0..12));
            s += &format!("        self.global_pool = {}\n", torch(&infos[12]));
            s += &format!("        self.flatten = {}\n", torch(&infos[13]));
            s += &format!("        self.classifier = nn.Sequential(\n{}        )\n\n", list(14..17));
            s += "    def forward(self, x):\n        return self.classifier(self.flatten(self.global_pool(self.conv_block(x))))\n\n\n";
            s += "model = Reference()\n";
        } else {
            s += "\nmodel = nn.Sequential(\n";
            for l in &infos {
                s += &format!("    {},  # {}\n", torch(l), l.name);
            }
            s += ")\n";
        }
        Ok(s)
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arch_text())
    }
}

impl PoolSpec {
    /// PyTorch's defaults: `stride=None` means the kernel size.
    pub fn new(kernel: Hw, stride: Option<Hw>, padding: Hw, ceil_mode: bool) -> PoolSpec {
        PoolSpec { kernel, stride: stride.unwrap_or(kernel), padding, ceil_mode }
    }

    fn write_args(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kernel)?;
        if self.stride != self.kernel {
            write!(f, ", stride={}", self.stride)?;
        }
        if self.padding != Hw::square(0) {
            write!(f, ", padding={}", self.padding)?;
        }
        if self.ceil_mode {
            f.write_str(", ceil_mode=True")?;
        }
        Ok(())
    }
}

impl fmt::Display for LayerSpec {
    /// The canonical text: PyTorch's names, arguments left out where they are the default.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSpec::Conv2d { out_channels, kernel, stride, padding } => {
                write!(f, "Conv2d({out_channels}, {kernel}")?;
                if *stride != Hw::square(1) {
                    write!(f, ", stride={stride}")?;
                }
                if *padding != Hw::square(0) {
                    write!(f, ", padding={padding}")?;
                }
                f.write_str(")")
            }
            LayerSpec::MaxPool2d(p) => {
                f.write_str("MaxPool2d(")?;
                p.write_args(f)?;
                f.write_str(")")
            }
            LayerSpec::AvgPool2d(p) => {
                f.write_str("AvgPool2d(")?;
                p.write_args(f)?;
                f.write_str(")")
            }
            LayerSpec::AdaptiveAvgPool2d => f.write_str("AdaptiveAvgPool2d(1)"),
            LayerSpec::Relu => f.write_str("ReLU"),
            LayerSpec::Dropout { p } => write!(f, "Dropout(p={p})"),
            LayerSpec::Flatten => f.write_str("Flatten"),
            LayerSpec::Linear { out_features: Some(n) } => write!(f, "Linear({n})"),
            LayerSpec::Linear { out_features: None } => f.write_str("Linear"),
        }
    }
}

fn max_pool(p: &PoolSpec) -> MaxPool2d {
    MaxPool2d::with_options(p.kernel, p.stride, p.padding, p.ceil_mode)
}

fn py_hw(v: Hw) -> String {
    if v.is_square() {
        v.h.to_string()
    } else {
        format!("({}, {})", v.h, v.w)
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// `[32, 31, 31]` as `32x31x31`.
pub fn shape_text(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// Works out one layer's output from its input shape (per image).
fn resolve_layer(layer: &LayerSpec, input: &[usize], classes: usize, is_last: bool, name: String) -> Result<LayerInfo> {
    let image = |what: &str| -> Result<(usize, usize, usize)> {
        match input {
            [c, h, w] => Ok((*c, *h, *w)),
            _ => bail!("{what} needs an image input (channels x height x width), got {}", shape_text(input)),
        }
    };
    let mut params = Vec::new();
    let mut flops = 0u64;
    let mut spec = *layer;
    let output = match *layer {
        LayerSpec::Conv2d { out_channels, kernel, stride, padding } => {
            let (c, h, w) = image("Conv2d")?;
            let (oh, ow) = window(h, w, kernel, stride, padding, false)?;
            params.push(("weight", vec![out_channels, c, kernel.h, kernel.w]));
            params.push(("bias", vec![out_channels]));
            flops = 2 * (c * kernel.h * kernel.w * out_channels * oh * ow) as u64;
            vec![out_channels, oh, ow]
        }
        LayerSpec::MaxPool2d(p) | LayerSpec::AvgPool2d(p) => {
            let (c, h, w) = image(if matches!(layer, LayerSpec::MaxPool2d(_)) { "MaxPool2d" } else { "AvgPool2d" })?;
            // PyTorch's rule: padding at most half the kernel, so no window is padding only.
            if 2 * p.padding.h > p.kernel.h || 2 * p.padding.w > p.kernel.w {
                bail!("padding {} must be at most half the kernel size {}", p.padding, p.kernel);
            }
            let (oh, ow) = window(h, w, p.kernel, p.stride, p.padding, p.ceil_mode)?;
            vec![c, oh, ow]
        }
        LayerSpec::AdaptiveAvgPool2d => {
            let (c, _, _) = image("AdaptiveAvgPool2d")?;
            vec![c, 1, 1]
        }
        LayerSpec::Relu | LayerSpec::Dropout { .. } => input.to_vec(),
        LayerSpec::Flatten => vec![input.iter().product()],
        LayerSpec::Linear { out_features } => {
            let features = match input {
                [f] => *f,
                _ => bail!("Linear needs a flat input, got {}: put Flatten before it", shape_text(input)),
            };
            let out = match out_features {
                Some(n) => n,
                None if is_last => classes,
                None => bail!("only the last Linear may leave out its size (it gets one output per class)"),
            };
            spec = LayerSpec::Linear { out_features: Some(out) };
            params.push(("weight", vec![out, features]));
            params.push(("bias", vec![out]));
            flops = 2 * (features * out) as u64;
            vec![out]
        }
    };
    Ok(LayerInfo { name, spec, input: input.to_vec(), output, params, flops })
}

/// The output height and width of a sliding window, or an error saying why there is none.
fn window(h: usize, w: usize, k: Hw, s: Hw, p: Hw, ceil: bool) -> Result<(usize, usize)> {
    match crate::layers::window_out_hw(h, w, k, s, p, ceil) {
        Some((oh, ow)) if oh > 0 && ow > 0 => Ok((oh, ow)),
        _ => bail!(
            "kernel {}x{} is larger than its padded input {}x{}: the shape shrinks to nothing",
            k.h,
            k.w,
            h + 2 * p.h,
            w + 2 * p.w
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing: text -> layers. A small hand-written scanner: `Name` or `Name(args)`, separated by
// spaces (or commas, or new lines); `#` starts a comment to the end of the line.

/// One argument value as written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Pair(i64, i64),
    None,
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::Bool(v) => f.write_str(py_bool(*v)),
            Value::Pair(a, b) => write!(f, "({a}, {b})"),
            Value::None => f.write_str("None"),
        }
    }
}

/// Parses the layer list (the `--arch` text or a file's contents).
pub fn parse_layers(text: &str) -> Result<Vec<LayerSpec>> {
    // Comments go first, so a `#` inside a line of a file hides the rest of that line only.
    let clean: String = text.lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let items = split_items(&clean)?;
    if items.is_empty() {
        bail!("the spec has no layers");
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_layer(item).with_context(|| format!("layer {} `{}`", i + 1, item.trim())))
        .collect()
}

/// Splits the text into one string per layer: a name with its parenthesised arguments.
fn split_items(text: &str) -> Result<Vec<String>> {
    let mut items = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() || c == ',' {
            i += 1;
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_') {
            let rest: String = chars[i..].iter().take(20).collect();
            bail!("layer {}: expected a layer name, found `{rest}`", items.len() + 1);
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
            i += 1;
        }
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        if j < chars.len() && chars[j] == '(' {
            let mut depth = 0;
            let mut end = None;
            for (k, &ch) in chars.iter().enumerate().skip(j) {
                match ch {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(k);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let Some(end) = end else {
                let text: String = chars[start..].iter().collect();
                bail!("layer {} `{}`: unclosed parenthesis", items.len() + 1, text.trim());
            };
            i = end + 1;
        }
        items.push(chars[start..i].iter().collect());
    }
    Ok(items)
}

/// Parses `Name(arg, name=value, ...)` into a layer, with PyTorch's argument names and defaults.
fn parse_layer(item: &str) -> Result<LayerSpec> {
    let (name, args) = match item.find('(') {
        Some(open) => (item[..open].trim(), &item[open + 1..item.len() - 1]),
        None => (item.trim(), ""),
    };
    let name = name.strip_prefix("nn.").or_else(|| name.strip_prefix("torch.nn.")).unwrap_or(name);
    // Each layer's arguments in PyTorch's positional order; the rest are keyword-only.
    let (positional, keywords): (&[&str], &[&str]) = match name {
        "Conv2d" | "LazyConv2d" => (&["out_channels", "kernel_size", "stride", "padding"], &[]),
        "MaxPool2d" => (&["kernel_size", "stride", "padding"], &["ceil_mode"]),
        "AvgPool2d" => (&["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"], &[]),
        "AdaptiveAvgPool2d" => (&["output_size"], &[]),
        "ReLU" => (&["inplace"], &[]),
        "Dropout" => (&["p", "inplace"], &[]),
        "Flatten" => (&[], &[]),
        "Linear" | "LazyLinear" => (&["out_features"], &[]),
        other => bail!(
            "unknown layer `{other}`; the layers are Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, ReLU, \
             Dropout, Flatten and Linear"
        ),
    };
    let args = parse_args(args, positional, keywords, name)?;
    let get = |k: &str| args.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    let required = |k: &str| get(k).ok_or_else(|| anyhow::anyhow!("{name} needs {k}"));
    Ok(match name {
        "Conv2d" | "LazyConv2d" => LayerSpec::Conv2d {
            out_channels: positive(required("out_channels")?, "out_channels")?,
            kernel: hw(required("kernel_size")?, "kernel_size", 1)?,
            stride: get("stride").map_or(Ok(Hw::square(1)), |v| hw(v, "stride", 1))?,
            padding: get("padding").map_or(Ok(Hw::square(0)), |v| hw(v, "padding", 0))?,
        },
        "MaxPool2d" | "AvgPool2d" => {
            if let Some(v) = get("count_include_pad").filter(|v| *v != Value::Bool(true)) {
                bail!("count_include_pad={v} is not supported (only PyTorch's default, True)");
            }
            let kernel = hw(required("kernel_size")?, "kernel_size", 1)?;
            let stride = match get("stride") {
                None | Some(Value::None) => None,
                Some(v) => Some(hw(v, "stride", 1)?),
            };
            let padding = get("padding").map_or(Ok(Hw::square(0)), |v| hw(v, "padding", 0))?;
            let ceil = get("ceil_mode").map_or(Ok(false), |v| boolean(v, "ceil_mode"))?;
            let p = PoolSpec::new(kernel, stride, padding, ceil);
            if name == "MaxPool2d" {
                LayerSpec::MaxPool2d(p)
            } else {
                LayerSpec::AvgPool2d(p)
            }
        }
        "AdaptiveAvgPool2d" => match required("output_size")? {
            Value::Int(1) | Value::Pair(1, 1) => LayerSpec::AdaptiveAvgPool2d,
            v => bail!("output_size={v} is not supported; only AdaptiveAvgPool2d(1), the global average pool"),
        },
        "ReLU" => {
            get("inplace").map_or(Ok(false), |v| boolean(v, "inplace"))?;
            LayerSpec::Relu
        }
        "Dropout" => {
            get("inplace").map_or(Ok(false), |v| boolean(v, "inplace"))?;
            let p = match get("p") {
                None => 0.5,
                Some(Value::Float(p)) => p,
                Some(Value::Int(p)) => p as f64,
                Some(v) => bail!("p must be a number in [0, 1), got {v}"),
            };
            if !(0.0..1.0).contains(&p) {
                bail!("p must be in [0, 1), got {p}");
            }
            LayerSpec::Dropout { p }
        }
        "Flatten" => LayerSpec::Flatten,
        _ => LayerSpec::Linear {
            out_features: match get("out_features") {
                None => None,
                Some(v) => Some(positive(v, "out_features")?),
            },
        },
    })
}

/// Splits `a, (b, c), k=v` into named values, positional ones named by `positional`.
fn parse_args(text: &str, positional: &[&str], keywords: &[&str], layer: &str) -> Result<Vec<(String, Value)>> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    let parts: Vec<&str> = parts.into_iter().map(str::trim).collect();
    // `f(a, b,)` and `f()` are fine in Python.
    let parts: Vec<&str> = match parts.as_slice() {
        [.., ""] => parts[..parts.len() - 1].to_vec(),
        _ => parts,
    };
    let mut out: Vec<(String, Value)> = Vec::new();
    let mut keyword_seen = false;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            bail!("empty argument");
        }
        let (name, value) = match part.split_once('=') {
            Some((k, v)) => {
                keyword_seen = true;
                let k = k.trim();
                if !positional.contains(&k) && !keywords.contains(&k) {
                    let all: Vec<&str> = positional.iter().chain(keywords).copied().collect();
                    if all.is_empty() {
                        bail!("unknown argument `{k}`: {layer} takes no arguments");
                    }
                    bail!("unknown argument `{k}`; {layer} takes {}", all.join(", "));
                }
                (k.to_string(), v.trim())
            }
            None => {
                if keyword_seen {
                    bail!("positional argument `{part}` after a keyword argument");
                }
                let Some(k) = positional.get(i) else {
                    bail!(
                        "too many arguments: {layer} takes at most {} without names ({})",
                        positional.len(),
                        positional.join(", ")
                    );
                };
                (k.to_string(), *part)
            }
        };
        if out.iter().any(|(n, _)| *n == name) {
            bail!("argument `{name}` given twice");
        }
        out.push((name.clone(), parse_value(value).with_context(|| format!("argument `{name}`"))?));
    }
    Ok(out)
}

fn parse_value(v: &str) -> Result<Value> {
    let v = v.trim();
    match v {
        "True" | "true" => return Ok(Value::Bool(true)),
        "False" | "false" => return Ok(Value::Bool(false)),
        "None" => return Ok(Value::None),
        _ => {}
    }
    if let Some(inner) = v.strip_prefix('(').and_then(|s| s.strip_suffix(')')) {
        let xs: Vec<&str> = inner.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        return match xs.as_slice() {
            [a, b] => Ok(Value::Pair(int(a)?, int(b)?)),
            _ => bail!("`{v}` is not an (h, w) pair"),
        };
    }
    if let Ok(i) = v.parse::<i64>() {
        return Ok(Value::Int(i));
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Value::Float(f)),
        _ => bail!("`{v}` is not a number, a pair, True or False"),
    }
}

fn int(s: &str) -> Result<i64> {
    s.parse::<i64>().map_err(|_| anyhow::anyhow!("`{s}` is not an integer"))
}

/// A size at least 1.
fn positive(v: Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(n) if n >= 1 => Ok(n as usize),
        _ => bail!("{what} must be a positive integer, got {v}"),
    }
}

/// An int or an (h, w) pair, each at least `min` (1 for kernels and strides, 0 for padding).
fn hw(v: Value, what: &str, min: i64) -> Result<Hw> {
    const MAX: i64 = 1 << 16;
    let (h, w) = match v {
        Value::Int(n) => (n, n),
        Value::Pair(h, w) => (h, w),
        _ => bail!("{what} must be an integer or an (h, w) pair, got {v}"),
    };
    if h < min || w < min {
        let least = if min == 0 { "zero or positive" } else { "at least 1" };
        bail!("{what} must be {least}, got {v}");
    }
    if h > MAX || w > MAX {
        bail!("{what} {v} is too large (at most {MAX})");
    }
    Ok(Hw { h: h as usize, w: w as usize })
}

fn boolean(v: Value, what: &str) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(b),
        _ => bail!("{what} must be True or False, got {v}"),
    }
}

/// Reads a spec file for tests and tools: the same as `--arch @FILE`.
pub fn read_spec_file(path: &Path, input: InputShape) -> Result<ModelSpec> {
    ModelSpec::parse(&format!("@{}", path.display()), input, REFERENCE_DROPOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ModelSpec {
        ModelSpec::parse(s, InputShape::default(), REFERENCE_DROPOUT).unwrap()
    }

    #[test]
    fn parses_the_issue_example_and_prints_it_back() {
        let s =
            spec("Conv2d(16, 5, padding=2) ReLU MaxPool2d(2) Conv2d(32, 3) ReLU AdaptiveAvgPool2d(1) Flatten Linear");
        assert_eq!(s.layers.len(), 8);
        assert_eq!(
            s.arch_text(),
            "Conv2d(16, 5, padding=2) ReLU MaxPool2d(2) Conv2d(32, 3) ReLU AdaptiveAvgPool2d(1) Flatten Linear"
        );
        assert_eq!(spec(&s.arch_text()), s);
    }

    #[test]
    fn spaces_inside_parentheses_pairs_and_keywords() {
        let s = spec("Conv2d( 8 , (3, 5), stride=(2, 1), padding = (1, 2) ) nn.ReLU() AvgPool2d(3, 2, 1, True) Flatten Linear(10) Dropout(0.25) Linear");
        assert_eq!(
            s.layers[0],
            LayerSpec::Conv2d {
                out_channels: 8,
                kernel: Hw { h: 3, w: 5 },
                stride: Hw { h: 2, w: 1 },
                padding: Hw { h: 1, w: 2 }
            }
        );
        assert_eq!(
            s.layers[2],
            LayerSpec::AvgPool2d(PoolSpec::new(Hw::square(3), Some(Hw::square(2)), Hw::square(1), true))
        );
        assert_eq!(s.arch_text(), "Conv2d(8, (3, 5), stride=(2, 1), padding=(1, 2)) ReLU AvgPool2d(3, stride=2, padding=1, ceil_mode=True) Flatten Linear(10) Dropout(p=0.25) Linear");
        assert_eq!(spec(&s.arch_text()), s);
    }

    #[test]
    fn the_reference_has_its_pytorch_names_and_count() {
        let s = spec("reference");
        let shapes = s.weight_shapes(6).unwrap();
        assert_eq!(shapes.len(), 12);
        assert_eq!(shapes[0], ("conv_block.0.weight".to_string(), vec![32, 1, 3, 3]));
        assert_eq!(shapes[11], ("classifier.2.bias".to_string(), vec![6]));
        let params: usize = shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(params, 421_510);
        assert_eq!(s.reference_dropout(), Some(0.4));
    }

    fn err(s: &str) -> String {
        match ModelSpec::parse(s, InputShape::default(), REFERENCE_DROPOUT).and_then(|m| m.resolve(6)) {
            Ok(_) => panic!("{s} was accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn bad_specs_name_the_layer_and_the_problem() {
        let cases = [
            ("Conv2d(8, 3) Relu Flatten Linear", "layer 2 `Relu`: unknown layer `Relu`"),
            ("Conv2d(8, 3, dilation=2) Flatten Linear", "layer 1 `Conv2d(8, 3, dilation=2)`: unknown argument `dilation`"),
            ("Conv2d(0, 3) Flatten Linear", "out_channels must be a positive integer, got 0"),
            ("Conv2d(8, -3) Flatten Linear", "kernel_size must be at least 1, got -3"),
            ("Conv2d(8, 3, stride=0) Flatten Linear", "stride must be at least 1, got 0"),
            ("Conv2d(8, 65) Flatten Linear", "layer 1 `Conv2d(8, 65)` (input 1x64x64): kernel 65x65 is larger than its padded input 64x64"),
            ("Conv2d(8, 3) MaxPool2d(2) MaxPool2d(2) MaxPool2d(2) MaxPool2d(2) MaxPool2d(2) MaxPool2d(2) Flatten Linear", "layer 7 `MaxPool2d(2)` (input 8x1x1): kernel 2x2 is larger"),
            ("Conv2d(8, 3) Linear", "layer 2 `Linear` (input 8x62x62): Linear needs a flat input, got 8x62x62: put Flatten before it"),
            ("Conv2d(8, 3) ReLU", "layer 2 `ReLU`: the last layer must be a Linear"),
            ("Flatten Linear Linear(3)", "layer 2 `Linear` (input 4096): only the last Linear may leave out its size"),
            ("MaxPool2d(2, padding=2) Flatten Linear", "padding 2 must be at most half the kernel size 2"),
            ("Conv2d(8, 3 Flatten Linear", "layer 1 `Conv2d(8, 3 Flatten Linear`: unclosed parenthesis"),
            ("Dropout(1.5) Flatten Linear", "p must be in [0, 1), got 1.5"),
            ("AdaptiveAvgPool2d(2) Flatten Linear", "only AdaptiveAvgPool2d(1)"),
            ("Flatten Conv2d(3, 3) Linear", "Conv2d needs an image input"),
            ("Conv2d(8, 3, 1, 0, 1) Flatten Linear", "too many arguments"),
            ("Conv2d(8, kernel_size=3, 2) Flatten Linear", "positional argument `2` after a keyword argument"),
            ("", "the spec has no layers"),
            ("Flatten Linear(10)", "layer 2 `Linear(10)` gives 10 outputs, but there are 6 classes"),
            ("@/nonexistent/spec.txt", "--arch @/nonexistent/spec.txt: cannot read the file"),
        ];
        for (s, want) in cases {
            let got = err(s);
            assert!(got.contains(want), "{s}:\n  got  {got}\n  want {want}");
        }
    }

    #[test]
    fn a_spec_file_has_one_layer_per_line_and_comments() {
        let dir = std::env::temp_dir().join(format!("medcnn-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net.txt");
        std::fs::write(&path, "# a small net\nConv2d(4, 3)  # first\nReLU\n\nMaxPool2d(2)\nFlatten\nLinear\n").unwrap();
        let s = read_spec_file(&path, InputShape::default()).unwrap();
        assert_eq!(s.arch_text(), "Conv2d(4, 3) ReLU MaxPool2d(2) Flatten Linear");
        std::fs::write(&path, "Conv2d(4, 3)\nMaxPool(2)\n").unwrap();
        let e = format!("{:#}", read_spec_file(&path, InputShape::default()).unwrap_err());
        assert!(e.contains("layer 2 `MaxPool(2)`: unknown layer"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn shapes_follow_pytorch() {
        // 64 -> conv 5 pad 2 stride 2: floor((64 + 4 - 5) / 2) + 1 = 32; avg 3/2 pad 1 ceil:
        // ceil((32 + 2 - 3) / 2) + 1 = 17 (the last window starts at 32 - 1 + ... inside).
        let s = spec(
            "Conv2d(6, 5, stride=2, padding=2) ReLU AvgPool2d(3, stride=2, padding=1, ceil_mode=True) Flatten Linear",
        );
        let infos = s.resolve(4).unwrap();
        assert_eq!(infos[0].output, vec![6, 32, 32]);
        assert_eq!(infos[2].output, vec![6, 17, 17]);
        assert_eq!(infos[4].output, vec![4]);
        assert_eq!(infos[0].flops, 2 * 25 * 6 * 32 * 32);
    }
}
