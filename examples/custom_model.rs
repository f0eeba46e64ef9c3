//! Your own Burn model in a federation: a small residual network, written here, registered
//! with cohort and trained by `cohort simulate`'s code with secure aggregation; the final
//! version is then served over gRPC and answers every site's held-out rows.
//!
//! ```sh
//! cargo run --release --example custom_model -- --participants 5 --rounds 10
//! ```
//!
//! Any `cohort simulate` flag may follow (`--dataset`, `--strategy`, `--plaintext`, …). The
//! model takes the dataset's rows, so the default, the bundled breast-cancer table, suits it.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig, Relu};
use burn::tensor::{Device, Int, Tensor};
use clap::Parser;
use cohort::simulate::{SimArgs, run};
use cohort_model::custom::{Build, FederatedModule, register};

/// Two linear layers with a normalised residual block between them.
#[derive(Module, Debug)]
struct ResidualMlp {
    input: Linear,
    norm: LayerNorm,
    block: Linear,
    output: Linear,
    act: Relu,
}

/// What cohort asks of a model: its forward pass and, optionally, its training forward pass
/// (with a seed for dropout masks) and its loss.
impl FederatedModule for ResidualMlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.act.forward(self.input.forward(x));
        let h = h.clone() + self.act.forward(self.block.forward(self.norm.forward(h)));
        self.output.forward(h)
    }

    /// Cross-entropy with label smoothing (cohort's default is plain cross-entropy).
    fn loss(&self, logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
        CrossEntropyLossConfig::new()
            .with_smoothing(Some(0.05))
            .init(&logits.device())
            .forward(logits, labels)
    }
}

/// How it is built on a device (cohort then loads the job's parameters into it).
impl Build for ResidualMlp {
    fn init(device: &Device) -> Self {
        ResidualMlp {
            input: LinearConfig::new(30, 32).init(device),
            norm: LayerNormConfig::new(32).init(device),
            block: LinearConfig::new(32, 32).init(device),
            output: LinearConfig::new(32, 2).init(device),
            act: Relu::new(),
        }
    }
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: SimArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    register::<ResidualMlp>("residual-mlp");
    let mut argv = vec![
        "custom_model".to_string(),
        "--custom-model".into(),
        "residual-mlp".into(),
    ];
    argv.extend(std::env::args().skip(1));
    let report = run(Cli::parse_from(argv).args).await?;
    println!(
        "residual-mlp: federated accuracy {:.4}, served accuracy {:.4} ({} rows answered)",
        report.federated_accuracy.unwrap_or(f64::NAN),
        report.served_accuracy,
        report.served_rows
    );
    Ok(())
}
