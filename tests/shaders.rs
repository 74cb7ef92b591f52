//! Every WGSL shader, with its preludes, parsed and validated by naga: a shader error fails here,
//! before any GPU run (and without a GPU).

use distillation::backend::wgpu::pipelines::Kernel;

#[test]
fn every_shader_validates() {
    let mut checked = Vec::new();
    for k in Kernel::ALL {
        let (name, src) = k.source();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let mut v = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        );
        v.validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        assert!(
            module
                .entry_points
                .iter()
                .any(|e| e.name == k.entry_point()),
            "{name} has no entry point {}",
            k.entry_point()
        );
        checked.push(name);
    }
    checked.dedup();
    println!("validated: {}", checked.join(", "));
    // Every shader file of shaders/ (the two preludes are inside every source) is some kernel's.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".wgsl") && name != "common.wgsl" && name != "row_io.wgsl" {
            assert!(
                checked.contains(&name.as_str()),
                "shaders/{name} is not validated (no Kernel uses it)"
            );
        }
    }
}
