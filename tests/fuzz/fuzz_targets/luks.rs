//! Fuzzes kiln's LUKS header checks (LUKS1 fields and key slots; LUKS2 binary header, checksum,
//! JSON metadata, segment, digest, key slots and their KDF costs) with whole header areas held in
//! memory. No key is derived (the KDF bounds would make each input cost seconds): what is fuzzed is
//! that every bound is applied and nothing panics or allocates without a bound.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // LUKS2 checksums the header: a mutated LUKS2 input almost always fails there, so every other
    // input gets its checksum fixed before the check, to reach the JSON.
    let mut b = data.to_vec();
    if b.len() >= 16384 && b[6..8] == [0, 2] && data.first().is_some_and(|x| x & 1 == 0) {
        use sha2::Digest;
        let hdr = u64::from_be_bytes(b[8..16].try_into().unwrap_or([0; 8]));
        if hdr.is_power_of_two() && (16384..=b.len() as u64).contains(&hdr) {
            b[448..512].fill(0);
            let sum = sha2::Sha256::digest(&b[..hdr as usize]);
            b[448..480].copy_from_slice(&sum);
        }
    }
    let _ = kiln::format::luks::check_header(&b);
});
