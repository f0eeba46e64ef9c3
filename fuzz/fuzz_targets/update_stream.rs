//! An update upload as the coordinator receives it: length-prefixed `UpdateChunk` messages,
//! a header first, then data chunks into the assembler the header names, then a trailer.
#![no_main]

use cohort_protocol::pb::{self, update_chunk::Part};
use cohort_protocol::secure::{bytes64, sealed_from_pb};
use cohort_protocol::{Assembler, BodyAssembler, ParamAssembler, Word};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn messages(mut data: &[u8]) -> Vec<pb::UpdateChunk> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 64 {
        let n = u16::from_le_bytes([data[0], data[1]]) as usize;
        data = &data[2..];
        let (m, rest) = data.split_at(n.min(data.len()));
        data = rest;
        match pb::UpdateChunk::decode(m) {
            Ok(c) => out.push(c),
            Err(_) => break,
        }
    }
    out
}

/// Data chunks into `asm` until the trailer, whose digest it then checks.
fn feed<T: Word>(mut asm: Assembler<T>, chunks: impl Iterator<Item = pb::UpdateChunk>) {
    for c in chunks {
        match c.part {
            Some(Part::Data(d)) => {
                if asm.push(&d).is_err() {
                    return;
                }
            }
            Some(Part::Trailer(t)) => {
                let _ = asm.finish_with_digest(&t.digest);
                return;
            }
            _ => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut chunks = messages(data).into_iter();
    let Some(pb::UpdateChunk {
        part: Some(Part::Header(h)),
    }) = chunks.next()
    else {
        return;
    };
    // Announced sizes are bounded as the service bounds them (by the model).
    let limit = 1 << 16;
    match h.secure {
        Some(sec) => {
            for p in &sec.pieces {
                let _ = sealed_from_pb(p);
            }
            let _ = bytes64(&sec.signature, "signature");
            feed(BodyAssembler::new(sec.num_bodies.min(limit)), chunks);
        }
        None => feed(ParamAssembler::new(h.num_parameters.min(limit)), chunks),
    }
});
