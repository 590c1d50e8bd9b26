//! No input from outside crashes a host: the fuzz harnesses of `gallocy_core::fuzzing`
//! on random bytes, and on every input of the fuzz corpora kept in `core/fuzz/corpus`
//! (so what the fuzzer once found stays tested).

use gallocy_core::fuzzing::{host_sequence, ipc_frame, peer_frame};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_host_sequences_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
        host_sequence(&data);
    }

    #[test]
    fn arbitrary_peer_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        peer_frame(&data);
    }

    #[test]
    fn arbitrary_ipc_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..640)) {
        ipc_frame(&data);
    }
}

#[test]
fn every_corpus_input_runs_cleanly() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/fuzz/corpus");
    let mut inputs = 0;
    for (target, harness) in [
        ("host_sequence", host_sequence as fn(&[u8])),
        ("peer_frame", peer_frame),
        ("ipc_frame", ipc_frame),
    ] {
        let Ok(entries) = std::fs::read_dir(corpus.join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            harness(&std::fs::read(&path).unwrap());
            inputs += 1;
        }
    }
    println!("{inputs} corpus inputs");
}
