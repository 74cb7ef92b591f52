//! Every WGSL shader, with its preludes, parsed and validated by naga: a shader error fails here,
//! before any GPU run (and without a GPU).

use distillation::backend::wgpu::pipelines::KERNELS;

#[test]
fn every_shader_validates() {
    let mut checked = Vec::new();
    for k in KERNELS {
        let (name, src) = (k.file, k.source());
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let mut v = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        v.validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        assert!(
            module.entry_points.iter().any(|e| e.name == k.entry),
            "{name} has no entry point {}",
            k.entry
        );
        checked.push(name);
    }
    checked.sort();
    checked.dedup();
    // Every entry point of the table is distinct (the pipeline cache keys on file and entry).
    let mut entries: Vec<_> = KERNELS.iter().map(|k| (k.file, k.entry)).collect();
    entries.sort();
    entries.dedup();
    assert_eq!(entries.len(), KERNELS.len(), "a kernel is listed twice");
    println!("validated: {}", checked.join(", "));
    // Every shader file of the crate (the two preludes are inside every source) is some kernel's.
    let mut files = Vec::new();
    wgsl_files(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() >= 12, "found only {files:?}");
    for name in files {
        if name != "common.wgsl" && name != "row_io.wgsl" {
            assert!(
                checked.contains(&name.as_str()),
                "{name} is not validated (no kernel of the table uses it)"
            );
        }
    }
}

/// The `.wgsl` file names under `dir`.
fn wgsl_files(dir: &std::path::Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            wgsl_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "wgsl") {
            out.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
}

/// Every `#[repr(C)]` uniform struct the wgpu backend uploads has the layout naga computes for
/// the WGSL `Params` it feeds: the same size, and each named field at the same offset (members
/// the Rust side does not name must be padding, `pad*`).
#[test]
fn uniform_structs_match_the_shaders() {
    use distillation::backend::wgpu::uniform_layouts;
    let layouts = uniform_layouts();
    for file in [
        "softmax.wgsl",
        "reduce.wgsl",
        "divergence.wgsl",
        "cross_entropy.wgsl",
        "hinton.wgsl",
        "sparse.wgsl",
        "mse.wgsl",
        "attention.wgsl",
        "dense.wgsl",
        "optim.wgsl",
        "conv.wgsl",
        "relational.wgsl",
    ] {
        assert!(
            layouts.iter().any(|l| l.file == file),
            "no Rust uniform struct is checked against {file}"
        );
    }
    for l in &layouts {
        let src = KERNELS
            .iter()
            .find(|k| k.file == l.file)
            .map(|k| k.source())
            .unwrap_or_else(|| panic!("no kernel uses {}", l.file));
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).unwrap();
        let (handle, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .unwrap_or_else(|| panic!("{} has no struct Params", l.file));
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{}: Params is not a struct", l.file)
        };
        assert_eq!(
            *span as usize, l.size,
            "{}: WGSL Params is {} bytes, Rust {} is {}",
            l.file, span, l.rust_name, l.size
        );
        assert_eq!(layouter[handle].size as usize, l.size, "{}", l.file);
        for m in members {
            let name = m.name.as_deref().unwrap_or("");
            match l.fields.iter().find(|(f, _)| *f == name) {
                Some((_, offset)) => assert_eq!(
                    m.offset as usize, *offset,
                    "{}: field {name} at offset {} in WGSL, {offset} in Rust {}",
                    l.file, m.offset, l.rust_name
                ),
                None => assert!(
                    name.starts_with("pad"),
                    "{}: WGSL member {name} has no field in Rust {}",
                    l.file,
                    l.rust_name
                ),
            }
        }
        for (f, _) in &l.fields {
            assert!(
                members.iter().any(|m| m.name.as_deref() == Some(f)),
                "{}: Rust {} field {f} is not in the WGSL struct",
                l.file,
                l.rust_name
            );
        }
    }
}
