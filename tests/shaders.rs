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
    assert_eq!(checked.len(), 10);
}
