//! The wgpu device against the CPU (flex) device on the same inputs. Without a GPU this runs on
//! Mesa's software Vulkan driver (lavapipe), which `.ci/run` installs.

use std::path::Path;

use cohort_model::data::{LabelColumn, load_csv};
use cohort_model::infer::max_abs_diff;
use cohort_model::train::predict_logits;
use cohort_model::{ComputeDevice, FeatureShape, ModelSpec, Optimizer, Standardizer, TrainConfig};

fn breast_cancer() -> cohort_model::Dataset {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/breast_cancer.csv");
    let mut ds = load_csv(&p, &LabelColumn::Name("diagnosis".into())).unwrap();
    Standardizer::fit(&ds).apply(&mut ds);
    ds
}

#[test]
fn wgpu_and_cpu_agree_on_inference_and_training() {
    let ds = breast_cancer();
    let spec = ModelSpec::for_shape(FeatureShape::Flat(30), 2, &[16]);
    let params = spec.initial_parameters(5);

    let on = |dev: ComputeDevice| {
        let d = dev.inference();
        predict_logits(&spec.build(&params, &d).unwrap(), &ds, &d)
    };
    let (cpu, gpu) = (on(ComputeDevice::Cpu), on(ComputeDevice::Wgpu));
    assert_eq!(cpu.len(), ds.len() * 2);
    let d = max_abs_diff(&cpu, &gpu);
    assert!(d < 1e-4, "logits differ by {d}");

    let cfg = TrainConfig {
        epochs: 2,
        batch_size: 64,
        learning_rate: 0.05,
        optimizer: Optimizer::Sgd,
        seed: 3,
        proximal_mu: 0.0,
        momentum: 0.0,
        weight_decay: 0.0,
    };
    let (p_cpu, r_cpu) =
        cohort_model::train(&spec, &params, &ds, &cfg, ComputeDevice::Cpu).unwrap();
    let (p_gpu, r_gpu) =
        cohort_model::train(&spec, &params, &ds, &cfg, ComputeDevice::Wgpu).unwrap();
    let d = max_abs_diff(&p_cpu, &p_gpu);
    assert!(d < 1e-4, "parameters after training differ by {d}");
    assert!((r_cpu.epoch_loss[1] - r_gpu.epoch_loss[1]).abs() < 1e-4);
    let acc = cohort_model::evaluate(&spec, &p_gpu, &ds, ComputeDevice::Wgpu)
        .unwrap()
        .accuracy;
    assert!(acc > 0.9, "accuracy on wgpu {acc}");
}

#[test]
fn cnn_runs_on_wgpu_like_on_the_cpu() {
    let spec = ModelSpec::Cnn {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    let params = spec.initial_parameters(1);
    // Deterministic pseudo-images.
    let n = 16;
    let features: Vec<f32> = (0..n * 784)
        .map(|i| ((i * 7919) % 256) as f32 / 255.0)
        .collect();
    let ds = cohort_model::Dataset::new(
        features,
        (0..n as u32).map(|i| i % 10).collect(),
        spec.input_shape(),
        10,
    )
    .unwrap();
    let on = |dev: ComputeDevice| {
        let d = dev.inference();
        predict_logits(&spec.build(&params, &d).unwrap(), &ds, &d)
    };
    let d = max_abs_diff(&on(ComputeDevice::Cpu), &on(ComputeDevice::Wgpu));
    assert!(d < 1e-4, "CNN logits differ by {d}");
}
