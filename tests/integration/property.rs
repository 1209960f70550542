//! Property test: random layouts of data, written zeros and holes, in raw and qcow2 sources, copied
//! by kiln to qcow2 and raw, and compared with qemu-img.

use crate::common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Seg {
    Data(u8),
    Zeros,
    Hole,
}

fn seg() -> impl Strategy<Value = (Seg, u64)> {
    let kind = prop_oneof![
        any::<u8>().prop_map(|b| Seg::Data(b | 1)),
        Just(Seg::Zeros),
        Just(Seg::Hole)
    ];
    // Lengths in 512-byte sectors, so extents start and end off cluster and 4 KiB boundaries.
    (kind, 1u64..400)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_layouts_copy_exactly(segs in prop::collection::vec(seg(), 1..14), cluster in prop_oneof![Just("4k"), Just("64k")]) {
        let t = tmp();
        let d = t.path();
        let raw = d.join("src.raw");
        let size: u64 = segs.iter().map(|s| s.1 * 512).sum();
        sparse_raw(&raw, size);
        let mut at = 0;
        for (i, (kind, n)) in segs.iter().enumerate() {
            let len = (n * 512) as usize;
            match kind {
                Seg::Data(b) => write_at(&raw, at, &(0..len).map(|j| b.wrapping_add((j / 512) as u8 ^ i as u8)).collect::<Vec<_>>()),
                Seg::Zeros => write_at(&raw, at, &vec![0u8; len]),
                Seg::Hole => {}
            }
            at += len as u64;
        }
        // The qcow2 form keeps written zeros allocated (-S 0) and uses its own cluster size.
        qemu_img(d, &["convert", "-S", "0", "-f", "raw", "-O", "qcow2", "-o", &format!("cluster_size={cluster}"), "src.raw", "src.qcow2"]);
        for fmt in ["qcow2", "raw"] {
            let o = format!("out-{fmt}");
            kiln_in(d, &["create", "--name", "img-p", "--format", fmt, "--cluster-size", cluster, "-j", "3",
                "--disk", "snapshot=src.raw,type=system", "--disk", "snapshot=src.qcow2", "--output-dir", &o]).ok();
            assert_same(d, "src.raw", &format!("{o}/xvda.{fmt}"));
            assert_same(d, "src.raw", &format!("{o}/xvdb.{fmt}"));
            if fmt == "qcow2" {
                assert_clean(d, &format!("{o}/xvda.qcow2"));
                assert_clean(d, &format!("{o}/xvdb.qcow2"));
            }
        }
    }
}
