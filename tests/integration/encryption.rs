//! Encrypted images (LUKS): kiln reads what qemu-img and cryptsetup make, writes what they open,
//! refuses wrong keys and damaged headers cleanly, and never lets the key out. qemu-img (with
//! `--object secret` and `--image-opts`) is the oracle for every byte.

use std::fs;
use std::path::Path;

use crate::common::*;

const KEY: &[u8] = b"kiln-canary-passphrase-7f3a\n";

/// A 24 MiB raw source with data at the start, in the middle and at the end, holes between.
fn source(dir: &Path) {
    let p = dir.join("src.raw");
    sparse_raw(&p, 24 * MIB);
    write_at(&p, 0, &noise(1, 3 * MIB as usize));
    write_at(&p, 10 * MIB + 4096, &noise(2, 200_000));
    write_at(&p, 24 * MIB - 65536, &noise(3, 65536));
    fs::write(dir.join("k"), KEY).unwrap();
    fs::write(dir.join("wrong"), b"kiln-canary-passphrase-7f3a").unwrap();
}

const SECRET: &str = "secret,id=s0,file=k";

fn image_opts(driver: &str, file: &str) -> String {
    match driver {
        "qcow2" => format!("driver=qcow2,file.filename={file},encrypt.key-secret=s0"),
        _ => format!("driver=luks,file.filename={file},key-secret=s0"),
    }
}

/// `qemu-img compare` of an encrypted image (opened with the key) and a plain one.
fn assert_same_decrypted(dir: &Path, driver: &str, enc: &str, plain: &str) {
    let r = tool_in(
        dir,
        "qemu-img",
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &image_opts(driver, enc),
            &format!("driver=raw,file.filename={plain}"),
        ],
    );
    assert_eq!(
        r.status, 0,
        "compare {enc} {plain}: {}{}",
        r.stdout, r.stderr
    );
}

/// qemu-img's encrypted convert: the oracle's plaintext of `enc`.
fn qemu_decrypt(dir: &Path, driver: &str, enc: &str, out: &str) {
    qemu_img(
        dir,
        &[
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &image_opts(driver, enc),
            "-O",
            "raw",
            out,
        ],
    );
}

/// kiln's raw LUKS2 volume of `src.raw`, with the key `k`.
fn kiln_luks2(dir: &Path, out: &str) {
    kiln_in(
        dir,
        &[
            "convert",
            "--encrypt",
            "--luks-version",
            "2",
            "--key-file",
            "k",
            "src.raw",
            out,
        ],
    )
    .ok();
}

fn qemu_encrypted_inputs(dir: &Path) {
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "--object",
            SECRET,
            "-f",
            "luks",
            "-o",
            "key-secret=s0,iter-time=10",
            "q.luks",
            "24M",
        ],
    );
    qemu_img(
        dir,
        &[
            "convert",
            "-n",
            "--object",
            SECRET,
            "--target-image-opts",
            "src.raw",
            &image_opts("luks", "q.luks"),
        ],
    );
    qemu_img(
        dir,
        &[
            "convert",
            "--object",
            SECRET,
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "src.raw",
            "q.qcow2",
        ],
    );
}

#[test]
fn qemu_made_luks_and_encrypted_qcow2_read_as_qemu_reads_them() {
    let t = tmp();
    let d = t.path();
    source(d);
    qemu_encrypted_inputs(d);
    for (driver, file) in [("luks", "q.luks"), ("qcow2", "q.qcow2")] {
        qemu_decrypt(d, driver, file, "oracle.raw");
        kiln_in(d, &["convert", "--key-file", "k", file, "kiln.raw"]).ok();
        assert_eq!(
            fs::read(d.join("kiln.raw")).unwrap(),
            fs::read(d.join("oracle.raw")).unwrap(),
            "{file}"
        );
        assert_same(d, "kiln.raw", "src.raw");
    }
    // The key from a descriptor and from the environment open it too.
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "convert",
            "--key-env",
            "KILN_TEST_KEY",
            "q.qcow2",
            "env.raw",
        ])
        .env(
            "KILN_TEST_KEY",
            std::ffi::OsStr::new(std::str::from_utf8(KEY).unwrap()),
        )
        .current_dir(d)
        .status()
        .unwrap();
    assert!(r.success());
    assert_same(d, "env.raw", "src.raw");
    let r = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "exec 7<k; exec {} convert --key-fd 7 q.luks fd.raw",
                env!("CARGO_BIN_EXE_kiln")
            ),
        ])
        .current_dir(d)
        .status()
        .unwrap();
    assert!(r.success());
    assert_same(d, "fd.raw", "src.raw");
}

#[test]
fn encrypted_outputs_equal_their_source_under_qemu_and_cryptsetup() {
    let t = tmp();
    let d = t.path();
    source(d);
    // qcow2 + LUKS, as qemu writes it: clean, identical, sparse.
    kiln_in(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "--encrypt",
            "--key-file",
            "k",
            "src.raw",
            "o.qcow2",
        ],
    )
    .ok();
    let r = tool_in(
        d,
        "qemu-img",
        &[
            "check",
            "--object",
            SECRET,
            "--image-opts",
            &image_opts("qcow2", "o.qcow2"),
        ],
    );
    assert_eq!(r.status, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("No errors"), "{}", r.stdout);
    assert_same_decrypted(d, "qcow2", "o.qcow2", "src.raw");
    let info = info(d, "o.qcow2");
    assert_eq!(info["encrypted"], true, "{info}");
    assert_eq!(
        info["format-specific"]["data"]["encrypt"]["format"], "luks",
        "{info}"
    );
    let size = fs::metadata(d.join("o.qcow2")).unwrap().len();
    assert!(
        size < 8 * MIB,
        "unallocated clusters stay unallocated: {size} bytes"
    );
    // With -t none the clusters, encrypted in place, go out through O_DIRECT.
    kiln_in(
        d,
        &[
            "convert",
            "-t",
            "none",
            "-O",
            "qcow2",
            "--encrypt",
            "--key-file",
            "k",
            "src.raw",
            "direct.qcow2",
        ],
    )
    .ok();
    assert_same_decrypted(d, "qcow2", "direct.qcow2", "src.raw");
    // Raw output: a LUKS1 volume qemu's luks driver opens.
    kiln_in(
        d,
        &[
            "convert",
            "--encrypt",
            "--key-file",
            "k",
            "src.raw",
            "o.luks",
        ],
    )
    .ok();
    assert_same_decrypted(d, "luks", "o.luks", "src.raw");
    assert!(tool_in(d, "cryptsetup", &["isLuks", "--type", "luks1", "o.luks"]).status == 0);
    // LUKS2: cryptsetup reads its header; kiln reads it back identically.
    kiln_luks2(d, "o2.luks");
    let dump = tool_in(d, "cryptsetup", &["luksDump", "o2.luks"])
        .ok()
        .stdout;
    assert!(
        dump.contains("Version:       \t2") && dump.contains("argon2id"),
        "{dump}"
    );
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    // cryptsetup's own KDF and AF merge open kiln's key slots (LUKS1 and LUKS2) with the key, and
    // not with another. (`cryptsetup open` proper needs device-mapper, which tests cannot count on.)
    for f in ["o.luks", "o2.luks"] {
        let test = |key: &str| {
            tool_in(
                d,
                "cryptsetup",
                &["open", "--test-passphrase", "--key-file", key, f],
            )
            .status
        };
        assert_eq!(test("k"), 0, "{f}");
        assert_ne!(test("wrong"), 0, "{f}");
    }
    kiln_in(d, &["convert", "--key-file", "k", "o2.luks", "back.raw"]).ok();
    assert_eq!(
        fs::read(d.join("back.raw")).unwrap(),
        fs::read(d.join("src.raw")).unwrap()
    );
    // And kiln reads its own qcow2 and LUKS1 outputs back.
    for f in ["o.qcow2", "o.luks"] {
        kiln_in(d, &["convert", "--key-file", "k", f, "back.raw"]).ok();
        assert_same(d, "back.raw", "src.raw");
    }
}

/// A cryptsetup LUKS1 volume filled through qemu's luks driver, and a LUKS2 volume with the same
/// volume key holding the same ciphertext: kiln reads the LUKS2 one as qemu reads the LUKS1 one.
/// (`cryptsetup open` needs root and device-mapper, so it is not used.)
#[test]
fn cryptsetup_made_luks1_and_luks2_read_as_qemu_reads_them() {
    let t = tmp();
    let d = t.path();
    source(d);
    fs::write(d.join("mk"), noise(9, 64)).unwrap();
    let format = |ty: &str, file: &str, extra: &[&str]| {
        sparse_raw(&d.join(file), 40 * MIB);
        let mut args = vec![
            "luksFormat",
            "--batch-mode",
            "--type",
            ty,
            "--volume-key-file",
            "mk",
            "--key-size",
            "512",
            "--cipher",
            "aes-xts-plain64",
            "--key-file",
            "k",
        ];
        args.extend_from_slice(extra);
        args.push(file);
        tool_in(d, "cryptsetup", &args).ok();
    };
    format(
        "luks1",
        "c1.luks",
        &["--pbkdf-force-iterations", "1000", "--hash", "sha256"],
    );
    format(
        "luks2",
        "c2.luks",
        &[
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-force-iterations",
            "4",
            "--sector-size",
            "512",
        ],
    );
    qemu_img(
        d,
        &[
            "convert",
            "-n",
            "--object",
            SECRET,
            "--target-image-opts",
            "src.raw",
            &image_opts("luks", "c1.luks"),
        ],
    );
    // Move c1's payload (at 2 MiB) to c2's (at 16 MiB): same key, same sector numbers.
    let c1 = fs::read(d.join("c1.luks")).unwrap();
    let payload = &c1[2 * MIB as usize..];
    write_at(&d.join("c2.luks"), 16 * MIB, &payload[..24 * MIB as usize]);
    fs::OpenOptions::new()
        .write(true)
        .open(d.join("c2.luks"))
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    qemu_decrypt(d, "luks", "c1.luks", "oracle.raw");
    kiln_in(d, &["convert", "--key-file", "k", "c1.luks", "k1.raw"]).ok();
    assert_eq!(
        fs::read(d.join("k1.raw")).unwrap(),
        fs::read(d.join("oracle.raw")).unwrap()
    );
    kiln_in(d, &["convert", "--key-file", "k", "c2.luks", "k2.raw"]).ok();
    let k2 = fs::read(d.join("k2.raw")).unwrap();
    assert_eq!(
        &k2[..24 * MIB as usize],
        &fs::read(d.join("src.raw")).unwrap()[..]
    );
}

fn refused(d: &Path, args: &[&str], code: &str, says: &[&str]) -> Run {
    let mut a = args.to_vec();
    a.push("--json");
    let r = kiln_in(d, &a);
    assert_eq!(r.status, 2, "{args:?}: {}{}", r.stdout, r.stderr);
    assert_eq!(r.code(), code, "{args:?}: {}", r.stdout);
    for s in says {
        assert!(
            r.stdout.contains(s),
            "{args:?} should say {s}: {}",
            r.stdout
        );
    }
    r
}

#[test]
fn bad_keys_and_damaged_headers_are_refused_cleanly() {
    let t = tmp();
    let d = t.path();
    source(d);
    qemu_encrypted_inputs(d);
    for f in ["q.luks", "q.qcow2"] {
        refused(
            d,
            &["convert", "--key-file", "wrong", f, "x.raw"],
            "InvalidSnapshot.KeyMismatch",
            &["does not open"],
        );
        refused(
            d,
            &["convert", f, "x.raw"],
            "MissingParameter",
            &["encrypted", "key-file"],
        );
    }
    // A key on the command line, in either form.
    refused(
        d,
        &["convert", "--key", "secret", "q.luks", "x.raw"],
        "InvalidParameter",
        &["never taken from the command line"],
    );
    refused(
        d,
        &[
            "create",
            "--name",
            "n",
            "--output-dir",
            "o",
            "--disk",
            "snapshot=q.luks,key=secret",
        ],
        "InvalidParameter",
        &["never taken from the command line"],
    );
    refused(
        d,
        &["convert", "--encrypt", "src.raw", "x.raw"],
        "MissingParameter",
        &["--encrypt needs a key"],
    );
    let luks = fs::read(d.join("q.luks")).unwrap();
    let damaged = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = luks.clone();
        f(&mut b);
        fs::write(d.join(name), b).unwrap();
    };
    // Truncated header.
    damaged("short.luks", &|b| b.truncate(300));
    refused(
        d,
        &[
            "convert",
            "--key-file",
            "k",
            "-f",
            "luks",
            "short.luks",
            "x.raw",
        ],
        "InvalidSnapshot.Corrupt",
        &["cut short"],
    );
    // A damaged key slot: its stripes, then its key material.
    damaged("stripes.luks", &|b| {
        b[208 + 44..208 + 48].copy_from_slice(&17u32.to_be_bytes())
    });
    refused(
        d,
        &["convert", "--key-file", "k", "stripes.luks", "x.raw"],
        "InvalidSnapshot.Corrupt",
        &["key slot 0", "stripes"],
    );
    damaged("material.luks", &|b| {
        let at = u32::from_be_bytes(b[208 + 40..208 + 44].try_into().unwrap()) as usize * 512;
        for x in &mut b[at..at + 4096] {
            *x ^= 0x55;
        }
    });
    refused(
        d,
        &["convert", "--key-file", "k", "material.luks", "x.raw"],
        "InvalidSnapshot.KeyMismatch",
        &[],
    );
    // Absurd KDF cost: refused at once, before any derivation.
    damaged("kdf.luks", &|b| {
        b[208 + 4..208 + 8].copy_from_slice(&u32::MAX.to_be_bytes())
    });
    let start = std::time::Instant::now();
    refused(
        d,
        &["convert", "--key-file", "k", "kdf.luks", "x.raw"],
        "InvalidSnapshot.Unsupported",
        &["iterations", "before any work"],
    );
    assert!(start.elapsed().as_secs() < 5);
    // qcow2's old AES (crypt_method 1): refused, naming the way out.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "--object",
            SECRET,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            "aes.qcow2",
            "1M",
        ],
    );
    refused(
        d,
        &["convert", "--key-file", "k", "aes.qcow2", "x.raw"],
        "InvalidSnapshot.Unsupported",
        &["insecure", "encrypt.format=luks"],
    );
    assert!(!d.join("x.raw").exists());
}

/// Every file, stdout and stderr of a create with a key, and of a failing run, is free of the key.
#[test]
fn create_records_encryption_and_never_leaks_the_key() {
    let t = tmp();
    let d = t.path();
    source(d);
    qemu_encrypted_inputs(d);
    fs::write(d.join("k2"), b"second-key").unwrap();
    // System disk from an encrypted qcow2 (key-file=), data disk encrypted on its own (encrypt=true).
    let r = kiln_in(
        d,
        &[
            "create",
            "--name",
            "enc",
            "--output-dir",
            "img",
            "--store",
            "store",
            "--key-file",
            "k",
            "--disk",
            "snapshot=q.qcow2,type=system,key-file=k",
            "--disk",
            "snapshot=src.raw,key-file=k2,encrypt=true",
            "--progress",
            "json",
        ],
    )
    .ok();
    let m = manifest(&d.join("img"));
    let disks = m["DiskDeviceMappings"].as_array().unwrap();
    assert_eq!(disks[0]["Encrypted"], false, "{m}");
    assert_eq!(disks[1]["Encrypted"], true, "{m}");
    assert_eq!(disks[1]["Encryption"]["Format"], "luks1");
    assert_eq!(disks[1]["Encryption"]["Cipher"], "aes-xts-plain64");
    assert_eq!(disks[1]["Encryption"]["KeySlotKdf"], "pbkdf2-sha256");
    kiln_in(d, &["verify", "img"]).ok();
    assert_sums(&d.join("img"));
    // The data disk opens with the command line's key (k), as qemu reads it.
    assert_same_decrypted(d, "qcow2", "img/xvdb.qcow2", "src.raw");
    // A whole-image --encrypt; kiln check reads the encrypted system disk with --key-file.
    let r2 = kiln_in(
        d,
        &[
            "create",
            "--name",
            "enc2",
            "--output-dir",
            "img2",
            "--encrypt",
            "--key-file",
            "k",
            "--snapshot",
            "q.luks",
        ],
    )
    .ok();
    assert_eq!(
        manifest(&d.join("img2"))["DiskDeviceMappings"][0]["Encrypted"],
        true
    );
    assert_same_decrypted(d, "qcow2", "img2/xvda.qcow2", "src.raw");
    let c = kiln_in(
        d,
        &["check", "--key-file", "k", "img2/xvda.qcow2", "--json"],
    );
    assert!(
        c.stdout.contains("PartitionTable"),
        "{}{}",
        c.stdout,
        c.stderr
    );
    let e = kiln_in(d, &["check", "img2/xvda.qcow2", "--json"]);
    assert_eq!(e.code(), "MissingParameter");
    let wrong = kiln_in(
        d,
        &[
            "convert",
            "--key-file",
            "wrong",
            "q.qcow2",
            "x.raw",
            "--json",
        ],
    );
    // The key's bytes (without its newline, as a string would carry it) appear nowhere.
    let needle = &KEY[..KEY.len() - 1];
    let texts = [
        r.stdout,
        r.stderr,
        r2.stdout,
        r2.stderr,
        c.stdout,
        c.stderr,
        e.stdout,
        wrong.stdout,
        wrong.stderr,
    ];
    for s in &texts {
        assert!(!contains(s.as_bytes(), needle), "key in output: {s}");
    }
    let mut files = Vec::new();
    collect(&d.join("img"), &mut files);
    collect(&d.join("img2"), &mut files);
    collect(&d.join("store"), &mut files);
    assert!(files.len() >= 6, "{files:?}");
    for f in files {
        let b = fs::read(&f).unwrap();
        assert!(
            !contains(&b, needle) && !contains(&b, b"second-key"),
            "key in {}",
            f.display()
        );
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                collect(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

#[test]
fn a_request_file_encrypts_and_names_key_files() {
    let t = tmp();
    let d = t.path();
    source(d);
    qemu_encrypted_inputs(d);
    fs::write(
        d.join("req.json"),
        r#"{"ImageName": "req-enc", "Encrypted": true,
            "DiskDeviceMapping": [{"SnapshotId": "q.luks", "DiskType": "system", "KeyFile": "k"}]}"#,
    )
    .unwrap();
    kiln_in(
        d,
        &[
            "create",
            "--request",
            "req.json",
            "--output-dir",
            "img",
            "--key-file",
            "k",
        ],
    )
    .ok();
    let m = manifest(&d.join("img"));
    assert_eq!(m["DiskDeviceMappings"][0]["Encrypted"], true, "{m}");
    assert_same_decrypted(d, "qcow2", "img/xvda.qcow2", "src.raw");
    // Encrypted without a key anywhere: refused before anything is written.
    refused(
        d,
        &["create", "--request", "req.json", "--output-dir", "img3"],
        "MissingParameter",
        &["--encrypt needs a key"],
    );
}

/// `kiln inspect --json` in `d`: its report.
fn inspect_json(d: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["inspect", "--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&kiln_in(d, &a).ok().stdout).unwrap()
}

/// Without a key, `kiln inspect` shows what is not encrypted: the LUKS header's version, cipher,
/// key size and key-slot KDF, the virtual size and (qcow2) the allocation map, as qemu-img gives
/// them with the key. With the key, it opens the file; a wrong key is refused. Neither the key
/// nor anything derived from it is shown.
#[test]
fn inspect_shows_encryption_without_the_key() {
    let t = tmp();
    let d = t.path();
    source(d);
    qemu_encrypted_inputs(d);
    kiln_luks2(d, "k2.luks");
    let cases = [
        ("q.qcow2", "qcow2", "luks1", "pbkdf2-sha256"),
        ("q.luks", "luks", "luks1", "pbkdf2-sha256"),
        ("k2.luks", "luks", "luks2", "argon2id"),
    ];
    for (file, driver, luks, kdf) in cases {
        let r = inspect_json(d, &["--map", file]);
        assert_eq!(r["format"], driver, "{r}");
        assert_eq!(r["encrypted"], true, "{r}");
        let e = &r["encryption"];
        assert_eq!(e["format"], luks, "{r}");
        assert_eq!(e["cipher"], "aes-xts-plain64", "{r}");
        assert_eq!(e["key-bits"], 512, "{r}");
        assert_eq!(e["key-slot-kdf"], kdf, "{r}");
        assert_eq!(e["unlocked"], false, "{r}");
        assert_eq!(r["virtual-size"], 24 * MIB, "{r}");
        if luks != "luks2" {
            // qemu-img (which reads LUKS1 only), given the key, sizes and maps it the same.
            let opts = image_opts(driver, file);
            let q = tool_in(
                d,
                "qemu-img",
                &[
                    "info",
                    "--output=json",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &opts,
                ],
            )
            .ok()
            .stdout;
            let q: serde_json::Value = serde_json::from_str(&q).unwrap();
            assert_eq!(q["virtual-size"], r["virtual-size"], "{q}");
            let m = qemu_img(
                d,
                &[
                    "map",
                    "--output=json",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &opts,
                ],
            );
            let qemu = crate::inspect::runs(&serde_json::from_str(&m).unwrap());
            let kiln = crate::inspect::runs(&r["map"]);
            crate::inspect::assert_same_classes(&kiln, &qemu, file);
        }
        // The qcow2 map keeps its holes without the key (a raw volume is data throughout).
        let holes = r["map"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["data"] == false);
        assert_eq!(holes, driver == "qcow2", "{r}");
        // Text names the same facts.
        let text = kiln_in(d, &["inspect", file]).ok().stdout;
        assert!(
            text.contains(&format!(
                "encrypted: yes ({luks}, aes-xts-plain64, 512-bit key, key slot KDF {kdf}"
            )) && text.contains("no key given"),
            "{text}"
        );
        // With the key it is opened; a wrong key is refused.
        let r = inspect_json(d, &["--key-file", "k", file]);
        assert_eq!(r["encryption"]["unlocked"], true, "{r}");
        refused(
            d,
            &["inspect", "--key-file", "wrong", file],
            "InvalidSnapshot.KeyMismatch",
            &["does not open"],
        );
    }
    // Reading the data still needs the key: an unencrypted file shows no encryption at all.
    refused(d, &["check", "q.qcow2"], "MissingParameter", &["key-file"]);
    let plain = inspect_json(d, &["src.raw"]);
    assert!(
        plain.get("encrypted").is_none() && plain.get("encryption").is_none(),
        "{plain}"
    );
}

/// `create --dry-run` shows, per disk, whether it would be encrypted and how (text and JSON), and
/// never the key.
#[test]
fn dry_run_shows_each_disks_encryption() {
    let t = tmp();
    let d = t.path();
    source(d);
    fs::write(d.join("k2"), b"second-key").unwrap();
    let args = [
        "create",
        "--dry-run",
        "--name",
        "enc",
        "--output-dir",
        "img",
        "--key-file",
        "k",
        "--disk",
        "snapshot=src.raw,type=system",
        "--disk",
        "snapshot=src.raw,key-file=k2,encrypt=true",
    ];
    let r = kiln_in(d, &[&args[..], &["--json"]].concat());
    assert_eq!(r.code(), "DryRunOperation", "{}{}", r.stdout, r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let disks = v["Plan"]["Disks"].as_array().unwrap();
    assert_eq!(disks[0]["Encrypted"], false, "{v}");
    assert!(disks[0].get("Encryption").is_none(), "{v}");
    assert_eq!(disks[1]["Encrypted"], true, "{v}");
    let e = &disks[1]["Encryption"];
    assert_eq!(e["Format"], "luks1", "{v}");
    assert_eq!(e["Cipher"], "aes-xts-plain64", "{v}");
    assert_eq!(e["KeySlotKdf"], "pbkdf2-sha256", "{v}");
    let text = kiln_in(d, &args);
    assert_eq!(text.status, 0, "{}{}", text.stdout, text.stderr);
    assert!(
        text.stdout.contains(
            "/dev/xvdb would be encrypted: luks1, aes-xts-plain64, 512-bit key, key slot KDF pbkdf2-sha256"
        ) && !text.stdout.contains("/dev/xvda would be encrypted"),
        "{}",
        text.stdout
    );
    // A whole raw image with --encrypt --luks-version 2: every disk, LUKS2 with argon2id.
    let r = kiln_in(
        d,
        &[
            "create",
            "--dry-run",
            "--name",
            "enc",
            "--output-dir",
            "img",
            "--format",
            "raw",
            "--encrypt",
            "--luks-version",
            "2",
            "--key-file",
            "k",
            "--snapshot",
            "src.raw",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let e = &v["Plan"]["Disks"][0]["Encryption"];
    assert_eq!(
        (e["Format"].as_str(), e["KeySlotKdf"].as_str()),
        (Some("luks2"), Some("argon2id")),
        "{v}"
    );
    let needle = &KEY[..KEY.len() - 1];
    for s in [&r.stdout, &r.stderr, &text.stdout, &text.stderr] {
        assert!(
            !contains(s.as_bytes(), needle) && !s.contains("second-key"),
            "{s}"
        );
    }
    assert!(!d.join("img").exists());
}
