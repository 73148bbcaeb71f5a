//! Configuration (`sluice::config::Config::from_toml`): the operator's TOML file.
//!
//! Beyond "no panic" (a typo in a config file must give an error naming the key, never a
//! crash): a config that validates is printed by `to_toml` (what `check-config` shows) as TOML
//! that parses back to the same config.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text, "fuzz") {
        let printed = config.to_toml();
        match Config::from_toml(&printed, "printed") {
            Ok(again) => assert_eq!(again, config, "printed as:\n{printed}"),
            Err(e) => panic!("the printed config does not parse: {e}\n{printed}"),
        }
    }
});
