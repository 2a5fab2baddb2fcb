//! The job spec parser on arbitrary bytes (JSON, MessagePack, TOML): an error, or a spec
//! that validates and survives a round trip through both wire encodings.
#![no_main]

use lathe_proto::JobSpec;
use lathe_proto::codec::{self, Format};
use libfuzzer_sys::fuzz_target;

fn round_trip(spec: &JobSpec) {
    let json = codec::to_json(spec);
    assert_eq!(
        &JobSpec::parse(&json, Format::Json).expect("re-encoded JSON parses"),
        spec
    );
    let mp = codec::to_msgpack(spec);
    assert_eq!(
        &JobSpec::parse(&mp, Format::MsgPack).expect("re-encoded MessagePack parses"),
        spec
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = JobSpec::parse(data, Format::Json) {
        round_trip(&spec);
    }
    if let Ok(spec) = JobSpec::parse(data, Format::MsgPack) {
        round_trip(&spec);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(spec) = JobSpec::parse_toml(text) {
            round_trip(&spec);
        }
    }
});
