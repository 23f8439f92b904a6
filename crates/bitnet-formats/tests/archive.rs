//! Model packages: sniffing, and unpacking tars of Hugging Face directories, hostile ones too.

use bitnet_formats::archive::{Limits, PackageKind, sniff, unpack_model_tar};
use std::io::Write;
use std::path::Path;

/// A tar entry: its name written as given (no checks: hostile names too), its type, its bytes.
fn entry(tar: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, data: &[u8], link: Option<&[u8]>) {
    let mut h = tar::Header::new_ustar();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

fn finish(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

fn hf_dir(prefix: &str) -> Vec<u8> {
    let mut t = Vec::new();
    let f = tar::EntryType::Regular;
    entry(
        &mut t,
        format!("{prefix}config.json").as_bytes(),
        f,
        br#"{"model_type": "bitnet"}"#,
        None,
    );
    entry(
        &mut t,
        format!("{prefix}model.safetensors").as_bytes(),
        f,
        &[7u8; 3000],
        None,
    );
    entry(
        &mut t,
        format!("{prefix}tokenizer.json").as_bytes(),
        f,
        b"{}",
        None,
    );
    finish(t)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn unpack(
    data: &[u8],
    gzip: bool,
    limits: Limits,
) -> (
    tempfile::TempDir,
    Result<bitnet_formats::archive::Unpacked, String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let r = unpack_model_tar(data, gzip, &dest, limits).map_err(|e| e.to_string());
    (dir, r)
}

/// Nothing was written outside `dir/out`.
fn only_out(dir: &Path) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, vec!["out".to_string()], "{names:?}");
}

#[test]
fn sniffing_tells_the_packages_apart() {
    assert_eq!(sniff(b"GGUF\x03\0\0\0"), PackageKind::Gguf);
    assert_eq!(sniff(&hf_dir("")), PackageKind::Tar);
    assert_eq!(sniff(&gzip(&hf_dir(""))), PackageKind::GzipTar);
    assert_eq!(sniff(&[0x08, 0x08, 0x12, 0x07]), PackageKind::Onnx);
    assert_eq!(sniff(b"hello, world"), PackageKind::Unknown);
    assert_eq!(sniff(b""), PackageKind::Unknown);
}

#[test]
fn a_hugging_face_directory_unpacks_plain_gzipped_and_under_a_top_directory() {
    for (data, gz, top) in [
        (hf_dir(""), false, false),
        (gzip(&hf_dir("")), true, false),
        (hf_dir("bitnet-tiny/"), false, true),
        (gzip(&hf_dir("./bitnet-tiny/")), true, true),
    ] {
        let (dir, r) = unpack(&data, gz, Limits::default());
        let u = r.unwrap();
        assert_eq!(u.files, 3);
        assert_eq!(u.bytes, 24 + 3000 + 2);
        assert!(u.model_dir.join("config.json").is_file());
        assert_eq!(u.model_dir.ends_with("bitnet-tiny"), top);
        assert_eq!(
            std::fs::read(u.model_dir.join("model.safetensors")).unwrap(),
            vec![7u8; 3000]
        );
        only_out(dir.path());
    }
}

#[test]
fn hostile_archives_are_refused_and_write_nothing_outside() {
    let f = tar::EntryType::Regular;
    let with = |name: &[u8], kind, link: Option<&[u8]>| {
        let mut t = Vec::new();
        entry(&mut t, b"config.json", f, b"{}", None);
        entry(&mut t, name, kind, b"x", link);
        finish(t)
    };
    for (data, why) in [
        (with(b"../evil", f, None), "outside the archive"),
        (with(b"a/../../evil", f, None), "outside the archive"),
        (with(b"/tmp/bitnet-evil", f, None), "outside the archive"),
        (
            with(b"link", tar::EntryType::Symlink, Some(b"/etc/passwd")),
            "symbolic link",
        ),
        (
            with(b"hard", tar::EntryType::Link, Some(b"config.json")),
            "hard link",
        ),
        (with(b"dev", tar::EntryType::Char, None), "device"),
        (with(b"config.json", f, None), "appears twice"),
    ] {
        let (dir, r) = unpack(&data, false, Limits::default());
        let e = r.unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
        only_out(dir.path());
    }
    assert!(!Path::new("/tmp/bitnet-evil").exists());
}

#[test]
fn absurd_sizes_bombs_truncation_and_missing_config_are_refused() {
    let f = tar::EntryType::Regular;
    // A header that claims a terabyte.
    let mut t = Vec::new();
    let mut h = tar::Header::new_ustar();
    h.set_path("model.safetensors").unwrap();
    h.set_size(1 << 40);
    h.set_cksum();
    t.extend_from_slice(h.as_bytes());
    t.extend_from_slice(&[0u8; 4096]);
    let (_d, r) = unpack(
        &t,
        false,
        Limits {
            max_entries: 100,
            max_bytes: 1 << 30,
        },
    );
    assert!(r.unwrap_err().contains("more than"));
    // 64 MiB of zeros in a few kB of gzip, against a 1 MiB limit.
    let mut big = Vec::new();
    entry(&mut big, b"config.json", f, b"{}", None);
    entry(&mut big, b"zeros.bin", f, &vec![0u8; 64 << 20], None);
    let bomb = gzip(&finish(big));
    assert!(bomb.len() < 1 << 20);
    let (_d, r) = unpack(
        &bomb,
        true,
        Limits {
            max_entries: 100,
            max_bytes: 1 << 20,
        },
    );
    let e = r.unwrap_err();
    assert!(e.contains("more than") || e.contains("size limit"), "{e}");
    // Too many entries.
    let mut many = Vec::new();
    for i in 0..20 {
        entry(&mut many, format!("f{i}").as_bytes(), f, b"", None);
    }
    let (_d, r) = unpack(
        &finish(many),
        false,
        Limits {
            max_entries: 10,
            max_bytes: 1 << 20,
        },
    );
    assert!(r.unwrap_err().contains("more than 10 entries"));
    // Cut short in the middle of a file.
    let whole = hf_dir("");
    let (_d, r) = unpack(&whole[..1024 + 512 + 1000], false, Limits::default());
    assert!(r.is_err());
    // No config.json anywhere usable.
    let mut t = Vec::new();
    entry(&mut t, b"model.safetensors", f, b"x", None);
    let (_d, r) = unpack(&finish(t), false, Limits::default());
    assert!(r.unwrap_err().contains("no config.json"));
    // Not a tar at all.
    let (_d, r) = unpack(
        b"GGUF and then some bytes that are not a tar",
        false,
        Limits::default(),
    );
    assert!(r.is_err());
}
