//! Property-based fuzzing of the frame decoder: arbitrary bytes and mutations of valid
//! frames are a frame or an error, never a panic, and nothing is allocated past the
//! limits (the data limit here is 4 KiB, so a frame announcing more must be refused
//! before its data is read). Bounded: a few hundred cases (PROPTEST_CASES overrides).

use distoptim_ps::protocol::{read_frame, read_head, write_frame, FrameError, Kind, Op, Request, MAX_UNAUTHENTICATED_HEADER};
use proptest::prelude::*;

const MAX_DATA: usize = 4096;

fn valid_frame() -> Vec<u8> {
    let req = Request { token: "t".into(), op: Op::SendGrads { context: 7, name: "w".into() } };
    let mut wire = Vec::new();
    write_frame(&mut wire, Kind::Request, &req, &[1.0, 2.0, 3.0]).unwrap();
    wire
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_a_frame_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok((_, data)) = read_frame::<_, Request>(&mut &bytes[..], Kind::Request, MAX_DATA) {
            prop_assert!(data.len() * 4 <= MAX_DATA);
        }
    }

    #[test]
    fn mutated_frames_never_read_past_their_limits(edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let mut wire = valid_frame();
        for (at, b) in edits {
            let n = wire.len();
            wire[at % n] = b;
        }
        wire.truncate(wire.len() - cut % 8);
        match read_head::<_, Request>(&mut &wire[..], Kind::Request, MAX_UNAUTHENTICATED_HEADER, MAX_DATA) {
            Ok((_, n)) => prop_assert!(n * 4 <= MAX_DATA),
            Err(FrameError::TooLarge { got, max }) => prop_assert!(got > max),
            Err(_) => {}
        }
        let _ = read_frame::<_, Request>(&mut &wire[..], Kind::Request, MAX_DATA);
    }
}
