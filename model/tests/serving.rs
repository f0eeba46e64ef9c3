//! A served Fashion-MNIST CNN: the same logits on wgpu and the CPU, and int8 within a point of
//! f32 on the real test set. Needs Debian's dataset-fashion-mnist (`.ci/run` installs it).

use std::path::Path;
use std::time::Instant;

use cohort_model::data::{IdxSplit, load_idx_dir};
use cohort_model::infer::max_abs_diff;
use cohort_model::train::metrics_from_logits;
use cohort_model::{ComputeDevice, InferenceModel, ModelSpec, Optimizer, Precision, TrainConfig};

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

#[test]
fn served_cnn_agrees_across_devices_and_int8_keeps_accuracy() {
    let dir = Path::new(FASHION);
    let train = load_idx_dir(dir, IdxSplit::Train).expect("apt-get install dataset-fashion-mnist");
    let test = load_idx_dir(dir, IdxSplit::Test).unwrap();
    let spec = ModelSpec::for_shape(train.shape, 10, &[]);
    let sub = train.subset(&(0..6_000).collect::<Vec<_>>());
    let t = Instant::now();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 64,
        learning_rate: 3e-3,
        optimizer: Optimizer::Adam,
        seed: 1,
        proximal_mu: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let (params, _) = cohort_model::train(
        &spec,
        &spec.initial_parameters(7),
        &sub,
        &cfg,
        ComputeDevice::Cpu,
    )
    .unwrap();
    eprintln!("trained in {:.1}s", t.elapsed().as_secs_f64());
    let x = &test.features;
    let run = |dev, prec| {
        let t = Instant::now();
        let m = InferenceModel::load(&spec, &params, dev, prec).unwrap();
        let out = m.logits_in_passes(x, 1000).unwrap();
        let acc = metrics_from_logits(&out, &test.labels, 10).accuracy;
        eprintln!(
            "{dev} {prec}: accuracy {acc:.4}, {:.2}s, quantized {:?}",
            t.elapsed().as_secs_f64(),
            m.quantized_tensors()
        );
        (out, acc)
    };
    let (cpu, acc_cpu) = run(ComputeDevice::Cpu, Precision::F32);
    let (gpu, acc_gpu) = run(ComputeDevice::Wgpu, Precision::F32);
    let d = max_abs_diff(&cpu, &gpu);
    eprintln!("max diff f32 {d}");
    let (_, acc_q) = run(ComputeDevice::Cpu, Precision::Int8);
    let (_, acc_qg) = run(ComputeDevice::Wgpu, Precision::Int8);
    assert!(d < 1e-4, "wgpu and CPU logits differ by {d}");
    assert!(acc_cpu > 0.7, "f32 accuracy {acc_cpu}");
    assert_eq!(acc_cpu, acc_gpu);
    assert!(
        (acc_cpu - acc_q).abs() <= 0.01,
        "int8 {acc_q} vs f32 {acc_cpu}"
    );
    assert!(
        (acc_cpu - acc_qg).abs() <= 0.01,
        "int8 on wgpu {acc_qg} vs f32 {acc_cpu}"
    );
}
