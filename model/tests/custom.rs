//! A Burn module written outside cohort's crates federates through the same trait as
//! cohort's own networks: its loss is the one the training loop minimises, its parameters
//! travel and are stored in its visiting order, and it is served in f32 or int8.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use cohort_model::custom::{Build, FederatedModule, register};
use cohort_model::data::load_csv;
use cohort_model::train::{Optimizer, TrainConfig, evaluate, train};
use cohort_model::{
    ComputeDevice, Dataset, InferenceModel, LabelColumn, ModelSpec, Precision, Standardizer,
};

static LOSSES: AtomicUsize = AtomicUsize::new(0);

#[derive(Module, Debug)]
struct Net {
    hidden: Linear,
    out: Linear,
    act: Relu,
}

impl FederatedModule for Net {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.act.forward(self.hidden.forward(x)))
    }
    fn loss(&self, logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
        LOSSES.fetch_add(1, Ordering::Relaxed);
        CrossEntropyLossConfig::new()
            .with_smoothing(Some(0.1))
            .init(&logits.device())
            .forward(logits, labels)
    }
}

impl Build for Net {
    fn init(device: &Device) -> Self {
        Net {
            hidden: LinearConfig::new(30, 24).init(device),
            out: LinearConfig::new(24, 2).init(device),
            act: Relu::new(),
        }
    }
}

fn breast_cancer() -> (Dataset, Dataset) {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/breast_cancer.csv");
    let mut ds = load_csv(&p, &LabelColumn::Name("diagnosis".into())).unwrap();
    Standardizer::fit(&ds).apply(&mut ds);
    ds.split(0.25, 1).unwrap()
}

/// Logits from any federated module: cohort's networks and a user's alike.
fn logits<M: FederatedModule>(m: &M, rows: &[f32], d: usize) -> Vec<f32> {
    let x = Tensor::<2>::from_data(
        TensorData::new(rows.to_vec(), [rows.len() / d, d]),
        &ComputeDevice::Cpu.inference(),
    );
    m.forward(x).into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_users_module_trains_with_its_own_loss_and_serves_in_f32_and_int8() {
    register::<Net>("test-net");
    let spec = ModelSpec::Custom {
        name: "test-net".into(),
        inputs: 30,
        channels: 0,
        height: 0,
        width: 0,
        classes: 2,
    };
    spec.validate().unwrap();
    let layout: Vec<String> = spec.layout().iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        layout,
        ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    );
    let (tr, te) = breast_cancer();
    let cfg = TrainConfig {
        epochs: 10,
        batch_size: 16,
        learning_rate: 0.05,
        optimizer: Optimizer::Sgd,
        seed: 3,
        proximal_mu: 0.0,
        momentum: 0.9,
        weight_decay: 0.0,
    };
    let p0 = spec.initial_parameters(1);
    let before = LOSSES.load(Ordering::Relaxed);
    let (p, report) = train(&spec, &p0, &tr, &cfg, ComputeDevice::Cpu).unwrap();
    // Its loss is the one minimised: called once a batch.
    let batches = 10 * tr.len().div_ceil(16);
    assert_eq!(LOSSES.load(Ordering::Relaxed) - before, batches);
    assert!(report.epoch_loss[9] < report.epoch_loss[0], "{report:?}");
    let m = evaluate(&spec, &p, &te, ComputeDevice::Cpu).unwrap();
    assert!(m.accuracy > 0.93, "held-out accuracy {}", m.accuracy);
    // Stored in its own names and read back.
    let bytes = spec.to_safetensors(&p).unwrap();
    assert_eq!(spec.params_from_safetensors(bytes).unwrap(), p);
    // Served in f32 and in int8 (its two linear weights quantized), with the same answers.
    let rows: Vec<f32> = (0..te.len()).flat_map(|i| te.row(i).to_vec()).collect();
    let f32s = InferenceModel::load(&spec, &p, ComputeDevice::Cpu, Precision::F32).unwrap();
    let int8 = InferenceModel::load(&spec, &p, ComputeDevice::Cpu, Precision::Int8).unwrap();
    assert_eq!(int8.quantized_tensors(), ["hidden.weight", "out.weight"]);
    let (a, b) = (
        f32s.logits(&rows, te.len()).unwrap(),
        int8.logits(&rows, te.len()).unwrap(),
    );
    let argmax = |l: &[f32]| -> Vec<bool> { l.chunks(2).map(|c| c[1] > c[0]).collect() };
    let agree = argmax(&a)
        .iter()
        .zip(argmax(&b))
        .filter(|(x, y)| **x == *y)
        .count();
    assert!(agree * 100 >= te.len() * 98, "{agree} of {}", te.len());
    assert!(cohort_model::infer::max_abs_diff(&a, &b) < 0.2);
    // The module and cohort's own network answer through the same trait.
    let net = Net::init(&ComputeDevice::Cpu.inference());
    let user = cohort_model::params::load_flat(net, &p).unwrap();
    assert_eq!(logits(&user, &rows, 30), a);
    let mlp = ModelSpec::Mlp {
        inputs: 30,
        hidden: vec![24],
        classes: 2,
    };
    let q = mlp.initial_parameters(2);
    let built = mlp.build(&q, &ComputeDevice::Cpu.inference()).unwrap();
    assert_eq!(
        logits(&built, &rows, 30),
        InferenceModel::load(&mlp, &q, ComputeDevice::Cpu, Precision::F32)
            .unwrap()
            .logits(&rows, te.len())
            .unwrap()
    );
}
