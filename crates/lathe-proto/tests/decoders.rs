//! Property tests: no decoder panics on arbitrary or mutated bytes; it returns an error.

use lathe_proto::codec::{self, Format};
use lathe_proto::{InferRequest, JobEvent, JobRecord, JobSpec, StageTask};
use proptest::prelude::*;

fn valid_spec_bytes() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../proto/examples/valid/digits.json"
    ))
    .unwrap()
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = JobSpec::parse(&bytes, Format::Json);
        let _ = JobSpec::parse(&bytes, Format::MsgPack);
        let _ = codec::from_msgpack::<StageTask>(&bytes);
        let _ = codec::from_msgpack::<JobRecord>(&bytes);
        let _ = codec::from_msgpack::<JobEvent>(&bytes);
        let _ = codec::decode_any::<InferRequest>(&bytes, None);
    }

    #[test]
    fn mutated_specs_never_panic(pos in 0usize..400, byte in any::<u8>(), cut in 0usize..400) {
        let mut json = valid_spec_bytes();
        let p = pos % json.len();
        json[p] = byte;
        let _ = JobSpec::parse(&json, Format::Json);
        json.truncate(cut % json.len());
        let _ = JobSpec::parse(&json, Format::Json);

        let spec = JobSpec::parse(&valid_spec_bytes(), Format::Json).unwrap();
        let mut mp = codec::to_msgpack(&spec);
        let p = pos % mp.len();
        mp[p] = byte;
        let _ = JobSpec::parse(&mp, Format::MsgPack);
        mp.truncate(cut % mp.len());
        let _ = JobSpec::parse(&mp, Format::MsgPack);
    }
}
