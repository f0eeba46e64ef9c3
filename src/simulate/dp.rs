//! `cohort simulate --dp`: the job's differential privacy from the command line, the noise
//! multiplier calibrated to `--target-epsilon` when none is given, and what the report says.

use anyhow::bail;
use cohort_coordinator::RoundSummary;
use cohort_coordinator::privacy::{PrivacySettings, calibrate};

use super::SimArgs;

/// The run's privacy settings, `None` without `--dp`. `q` is the rate at which rounds sample
/// participants and `rounds` how many there are (for the calibration).
pub(super) fn settings(args: &SimArgs, q: f64) -> anyhow::Result<Option<PrivacySettings>> {
    let Some(mechanism) = args.dp else {
        if args.noise_multiplier.is_some() || args.target_epsilon.is_some() {
            bail!("--noise-multiplier and --target-epsilon go with --dp distributed|central");
        }
        return Ok(None);
    };
    if args.clip_norm.is_none() {
        bail!(
            "--dp needs --clip-norm: the L2 norm every update is clipped to bounds what one \
             participant can change, and the noise is sized from it"
        );
    }
    let noise_multiplier = match (args.noise_multiplier, args.target_epsilon) {
        (Some(z), _) => z,
        (None, Some(eps)) => calibrate(eps, args.delta, q, args.rounds).ok_or_else(|| {
            anyhow::anyhow!(
                "no noise multiplier up to 10^4 keeps {} rounds at sampling rate {q:.4} within \
                 ε = {eps} (δ = {})",
                args.rounds,
                args.delta
            )
        })?,
        (None, None) => bail!("--dp needs --noise-multiplier or --target-epsilon"),
    };
    let p = PrivacySettings {
        mechanism,
        noise_multiplier,
        delta: args.delta,
        target_epsilon: args.target_epsilon,
    };
    p.validate().map_err(anyhow::Error::msg)?;
    Ok(Some(p))
}

/// The report's `privacy`: the settings and what the run spent.
pub(super) fn report(p: &PrivacySettings, history: &[RoundSummary]) -> serde_json::Value {
    let last = history.iter().rev().find_map(|s| s.privacy);
    serde_json::json!({
        "mechanism": p.mechanism,
        "noise_multiplier": p.noise_multiplier,
        "accounted_noise_multiplier": last.map(|l| l.noise_multiplier),
        "sampling_rate": last.map(|l| l.sampling_rate),
        "delta": p.delta,
        "target_epsilon": p.target_epsilon,
        "epsilon": last.map(|l| l.epsilon),
        "accountant": "RDP of the Poisson-sampled Gaussian (dp-accounting's orders), converted to (ε, δ)",
    })
}
