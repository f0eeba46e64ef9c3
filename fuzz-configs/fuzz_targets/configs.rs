//! Configuration text: coordinator.toml, a job specification (`cohort admin jobs create`)
//! participant.toml and serve.toml. Parsing and validation must refuse bad input with an error, never
//! panic; a specification that parses must survive its own round trip.
#![no_main]

use cohort_coordinator::CoordinatorConfig;
use cohort_coordinator::config::JobSection;
use cohort_participant::ParticipantConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = CoordinatorConfig::parse(text) {
        let _ = c.state_path();
    }
    if let Ok(spec) = JobSection::parse_spec(text) {
        let again = JobSection::parse_spec(&spec.to_spec())
            .expect("a valid specification reads back from its own TOML");
        assert_eq!(again.job_config().ok(), spec.job_config().ok());
    }
    let _ = ParticipantConfig::parse(text, std::path::Path::new("/fuzz"));
    let _ = cohort_serving::ServeConfig::parse(text);
});
