//! The traits a Burn module implements to be federated: [`FederatedModule`] (its forward
//! pass, training forward pass and loss), which cohort's training loop, flat vectors and
//! serving take, and [`Build`] (how it is built on a device), which registering a model of
//! your own needs ([`crate::custom`]). cohort's own networks implement the first as a
//! user's module does.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Int, Tensor};

/// A Burn module cohort can federate: what cohort's training loop, flat vectors, model
/// registry and serving ask of a model. cohort's own networks (presets and declared stacks,
/// [`crate::Network`]) implement it as a user's module does.
pub trait FederatedModule: Module + 'static {
    /// Logits `[batch, classes]` for examples flattened to rows `[batch, features]` (an image
    /// channel by channel, then row by row): evaluation and serving.
    fn forward(&self, x: Tensor<2>) -> Tensor<2>;

    /// Logits in training. `seed` is the step's own, drawn from the task's seed, for any
    /// randomness (dropout masks) that must give the same model in every engine. By default
    /// [`Self::forward`].
    fn forward_train(&self, x: Tensor<2>, seed: u64) -> Tensor<2> {
        let _ = seed;
        self.forward(x)
    }

    /// A batch's training loss from its logits and labels (class indices). By default the
    /// mean cross-entropy; FedProx's and SCAFFOLD's terms are added by cohort.
    fn loss(&self, logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, labels)
    }
}

/// A [`FederatedModule`] that builds itself: what [`crate::custom::register`] needs. (cohort's own networks
/// are built from their [`crate::ModelSpec`] instead.)
pub trait Build: FederatedModule {
    /// The module on `device`, with any initial values (cohort replaces them).
    fn init(device: &Device) -> Self;
}
