//! The configuration file parser on arbitrary text: a config or a clean error, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = rustorium_p2p_cli::config_file::FileConfig::from_toml_str(text);
    }
});
