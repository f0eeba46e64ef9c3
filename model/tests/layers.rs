//! Declared layer stacks through the public API: their layout is Burn's, the presets are
//! their stacks, bad stacks are refused naming the layer, and batch norm and dropout train
//! deterministically.

use burn::store::ModuleSnapshot;
use burn::tensor::{Tensor, TensorData};
use cohort_model::data::load_csv;
use cohort_model::layers::{Layer, check, summary};
use cohort_model::train::{Optimizer, TrainConfig, evaluate, train};
use cohort_model::{ComputeDevice, Dataset, FeatureShape, LabelColumn, ModelSpec, Standardizer};

fn lenet() -> ModelSpec {
    toml::from_str(
        r#"
        kind = "layers"
        channels = 1
        height = 28
        width = 28
        classes = 10

        [[layers]]
        type = "conv2d"
        channels = 6
        kernel = 5
        [[layers]]
        type = "relu"
        [[layers]]
        type = "max_pool2d"
        size = 2
        [[layers]]
        type = "conv2d"
        channels = 16
        kernel = 5
        [[layers]]
        type = "batch_norm"
        [[layers]]
        type = "relu"
        [[layers]]
        type = "max_pool2d"
        size = 2
        [[layers]]
        type = "flatten"
        [[layers]]
        type = "linear"
        units = 120
        [[layers]]
        type = "dropout"
        p = 0.25
        [[layers]]
        type = "layer_norm"
        [[layers]]
        type = "gelu"
        [[layers]]
        type = "linear"
        units = 10
        "#,
    )
    .unwrap()
}

fn names(net: &cohort_model::Network) -> Vec<String> {
    let cohort_model::Network::Layers(m) = net else {
        panic!("not a layer stack")
    };
    m.collect(None, None, false)
        .into_iter()
        .map(|t| t.name)
        .collect()
}

#[test]
fn a_declared_stack_has_burns_layout_and_round_trips() {
    let spec = lenet();
    spec.validate().unwrap();
    let layout = spec.layout();
    // 6·25+6, BN over 16 channels (4 × 16), 16·25·6+16, 256·120+120, LN (2 × 120), 120·10+10.
    assert_eq!(spec.num_parameters(), 156 + 2416 + 64 + 30840 + 240 + 1210);
    let dev = ComputeDevice::Cpu.inference();
    let params = spec.initial_parameters(4);
    let net = spec.build(&params, &dev).unwrap();
    let want: Vec<String> = layout.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names(&net), want);
    assert_eq!(net.to_flat(), params, "flatten(unflatten(p)) != p");
    // Batch norm starts at γ 1, β 0, mean 0, variance 1.
    let bn = layout
        .iter()
        .position(|p| p.name.contains("batch_norm"))
        .unwrap();
    let at = |i: usize| {
        layout[..i]
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum::<usize>()
    };
    assert_eq!(params[at(bn)..at(bn) + 16], [1.0; 16]);
    assert_eq!(params[at(bn + 3)..at(bn + 4)], [1.0; 16]);
    assert_eq!(params[at(bn + 2)..at(bn + 3)], [0.0; 16]);
    // The safetensors file loads back into the same network.
    let bytes = net.to_safetensors().unwrap();
    let back = spec
        .build(&spec.initial_parameters(5), &dev)
        .unwrap()
        .load_safetensors(bytes)
        .unwrap();
    assert_eq!(back.to_flat(), params);
    assert_eq!(
        summary(match &spec {
            ModelSpec::Layers { layers, .. } => &layers[..4],
            _ => unreachable!(),
        }),
        "conv2d(6, 5×5) → relu → max_pool2d(2) → conv2d(16, 5×5)"
    );
}

#[test]
fn the_presets_are_their_layer_stacks() {
    let dev = ComputeDevice::Cpu.inference();
    let image: Vec<f32> = (0..2 * 784)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    for spec in [
        ModelSpec::Logistic {
            inputs: 8,
            classes: 3,
        },
        ModelSpec::Mlp {
            inputs: 8,
            hidden: vec![16, 4],
            classes: 3,
        },
        ModelSpec::Cnn {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        },
    ] {
        let stack = spec.as_layers();
        stack.validate().unwrap();
        assert_eq!(stack.num_parameters(), spec.num_parameters(), "{spec:?}");
        let shapes = |s: &ModelSpec| s.layout().into_iter().map(|p| p.shape).collect::<Vec<_>>();
        assert_eq!(shapes(&stack), shapes(&spec), "{spec:?}");
        let params = spec.initial_parameters(9);
        let d = spec.input_shape().len();
        let x = || Tensor::<2>::from_data(TensorData::new(image[..2 * d].to_vec(), [2, d]), &dev);
        let a = spec.build(&params, &dev).unwrap().forward(x());
        let b = stack.build(&params, &dev).unwrap().forward(x());
        assert_eq!(
            a.into_data().try_into_vec::<f32>().unwrap(),
            b.into_data().try_into_vec::<f32>().unwrap(),
            "{spec:?}"
        );
    }
}

#[test]
fn a_bad_stack_is_refused_naming_the_layer() {
    let stack = |input: FeatureShape, layers: Vec<Layer>| check(input, &layers, 10).unwrap_err();
    let image = FeatureShape::Image {
        channels: 1,
        height: 4,
        width: 4,
    };
    let conv = |kernel| Layer::Conv2d {
        channels: 2,
        kernel,
        stride: 1,
        padding: 0,
    };
    let e = stack(
        image,
        vec![Layer::Relu, conv(5), Layer::Linear { units: 10 }],
    );
    assert_eq!(
        e,
        "layer 1 (conv2d): kernel 5 does not fit its 4×4 input (padding 0)"
    );
    let e = stack(FeatureShape::Flat(8), vec![Layer::MaxPool2d { size: 2 }]);
    assert!(
        e.starts_with("layer 0 (max_pool2d): pooling needs an image"),
        "{e}"
    );
    let e = stack(image, vec![Layer::LayerNorm, Layer::Linear { units: 10 }]);
    assert!(e.starts_with("layer 0 (layer_norm)"), "{e}");
    let e = stack(
        image,
        vec![Layer::Dropout { p: 1.0 }, Layer::Linear { units: 10 }],
    );
    assert_eq!(e, "layer 0 (dropout): p must be in [0, 1), not 1");
    let e = stack(image, vec![Layer::Linear { units: 7 }, Layer::Relu]);
    assert!(
        e.starts_with("layer 1 (relu) gives 7 values, not the 10 classes"),
        "{e}"
    );
    let e = stack(image, vec![]);
    assert!(e.starts_with("no layers"), "{e}");
    // In a specification: an unknown layer type or key is named by the parser; a bad layer
    // by its position.
    let parse = |layers: &str| {
        toml::from_str::<ModelSpec>(&format!(
            "kind = \"layers\"\ninputs = 4\nclasses = 2\n{layers}"
        ))
    };
    let e = parse("[[layers]]\ntype = \"convolution\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("convolution") && e.contains("conv2d"), "{e}");
    let e = parse("[[layers]]\ntype = \"linear\"\nunits = 2\nunit = 3")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unit"), "{e}");
    let spec =
        parse("[[layers]]\ntype = \"linear\"\nunits = 0\n[[layers]]\ntype = \"linear\"\nunits = 2")
            .unwrap();
    assert_eq!(
        spec.validate().unwrap_err().to_string(),
        "invalid model spec: layer 0 (linear): units must be at least 1"
    );
    let both = ModelSpec::Layers {
        inputs: 4,
        channels: 1,
        height: 2,
        width: 2,
        classes: 2,
        layers: vec![Layer::Linear { units: 2 }],
    };
    assert!(
        both.validate()
            .unwrap_err()
            .to_string()
            .contains("one or the other")
    );
}

fn breast_cancer() -> (Dataset, Dataset) {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/breast_cancer.csv");
    let mut ds = load_csv(&p, &LabelColumn::Name("diagnosis".into())).unwrap();
    Standardizer::fit(&ds).apply(&mut ds);
    ds.split(0.25, 1).unwrap()
}

/// Batch norm's running statistics move in training and travel in the flat vector; dropout
/// masks follow the task's seed (the same seed, the same bits) and are off in evaluation.
#[test]
fn batch_norm_and_dropout_train_deterministically() {
    let (tr, te) = breast_cancer();
    let spec = ModelSpec::Layers {
        inputs: 30,
        channels: 0,
        height: 0,
        width: 0,
        classes: 2,
        layers: vec![
            Layer::Linear { units: 32 },
            Layer::BatchNorm,
            Layer::Relu,
            Layer::Dropout { p: 0.3 },
            Layer::Linear { units: 2 },
        ],
    };
    let cfg = |seed| TrainConfig {
        epochs: 20,
        batch_size: 16,
        learning_rate: 0.05,
        optimizer: Optimizer::Sgd,
        seed,
        proximal_mu: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let p0 = spec.initial_parameters(1);
    let (a, _) = train(&spec, &p0, &tr, &cfg(7), ComputeDevice::Cpu).unwrap();
    let (b, _) = train(&spec, &p0, &tr, &cfg(7), ComputeDevice::Cpu).unwrap();
    let (c, _) = train(&spec, &p0, &tr, &cfg(8), ComputeDevice::Cpu).unwrap();
    assert_eq!(a, b, "same seed, same model");
    assert_ne!(a, c);
    let mut without = spec.clone();
    if let ModelSpec::Layers { layers, .. } = &mut without {
        layers[3] = Layer::Dropout { p: 0.0 };
    }
    let (d, _) = train(&without, &p0, &tr, &cfg(7), ComputeDevice::Cpu).unwrap();
    assert_ne!(a, d, "dropout dropped nothing");
    // running_mean of the 32 batch-normalised features (after γ and β).
    let mean = &a[30 * 32 + 32 + 64..30 * 32 + 32 + 96];
    assert!(mean.iter().any(|&m| m.abs() > 1e-3), "{mean:?}");
    let m1 = evaluate(&spec, &a, &te, ComputeDevice::Cpu).unwrap();
    let m2 = evaluate(&spec, &a, &te, ComputeDevice::Cpu).unwrap();
    assert_eq!(m1, m2, "no dropout in evaluation");
    assert!(m1.accuracy > 0.93, "held-out accuracy {}", m1.accuracy);
}

/// An embedding given by position (rows encoded elsewhere): Burn's names, N(0, 1) tables,
/// and shapes it cannot take named.
#[test]
fn an_embedding_by_position_has_burns_layout_and_is_checked() {
    let emb = |offset, categories| Layer::Embedding {
        dim: 10,
        column: None,
        offset,
        categories,
    };
    let spec = ModelSpec::Layers {
        inputs: 105,
        channels: 0,
        height: 0,
        width: 0,
        classes: 2,
        layers: vec![emb(3, 100), Layer::LayerNorm, Layer::Linear { units: 2 }],
    };
    spec.validate().unwrap();
    assert_eq!(spec.num_parameters(), 100 * 10 + 2 * 15 + 15 * 2 + 2);
    let params = spec.initial_parameters(3);
    let net = spec
        .build(&params, &ComputeDevice::Cpu.inference())
        .unwrap();
    let want: Vec<String> = spec.layout().iter().map(|p| p.name.clone()).collect();
    assert_eq!(names(&net), want);
    assert_eq!(want[0], "layers.0.embedding.weight");
    // The table starts N(0, 1), as PyTorch's embeddings do.
    let table = &params[..1000];
    let mean = table.iter().sum::<f32>() / 1000.0;
    let var = table.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 1000.0;
    assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "{mean} {var}");
    let e = check(FeatureShape::Flat(105), &[emb(10, 100)], 2).unwrap_err();
    assert_eq!(
        e,
        "layer 0 (embedding): its block [10, 110) does not fit a row of 105 values"
    );
    let e = check(FeatureShape::Flat(105), &[emb(0, 0)], 2).unwrap_err();
    assert!(e.starts_with("layer 0 (embedding): give column"), "{e}");
    let image = FeatureShape::Image {
        channels: 1,
        height: 4,
        width: 4,
    };
    let e = check(image, &[emb(0, 4)], 2).unwrap_err();
    assert!(e.contains("flat row, and it receives an image"), "{e}");
    assert_eq!(summary(&[emb(3, 100)]), "embedding(100 from 3 → 10)");
    // Served in int8 (the table quantized with the linear layers), it answers like f32.
    let rows: Vec<f32> = (0..20)
        .flat_map(|i| {
            let mut row = vec![0.5, -1.0, (i as f32).cos()];
            row.extend((0..100).map(|k| if k == i * 3 { 1.0 } else { 0.0 }));
            row.extend([1.0, 0.0]);
            row
        })
        .collect();
    let logits = |precision| {
        cohort_model::InferenceModel::load(&spec, &params, ComputeDevice::Cpu, precision)
            .unwrap()
            .logits(&rows, 20)
            .unwrap()
    };
    let (f32s, int8) = (
        logits(cohort_model::Precision::F32),
        logits(cohort_model::Precision::Int8),
    );
    let diff = cohort_model::infer::max_abs_diff(&f32s, &int8);
    assert!(diff < 0.1, "int8 against f32: {diff}");
    assert_ne!(
        f32s[..2],
        f32s[2..4],
        "rows of other categories, other logits"
    );
}
