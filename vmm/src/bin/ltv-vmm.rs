//! Stand-alone VMM for tests and benchmarks: `ltv-vmm --config FILE` (same as `ltv vmm`).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = match args.as_slice() {
        [_, flag, path] if flag == "--config" => path.clone(),
        _ => {
            eprintln!("usage: ltv-vmm --config FILE");
            std::process::exit(ltv_vmm::EXIT_BAD_CONFIG);
        }
    };
    std::process::exit(ltv_vmm::vmm_main(std::path::Path::new(&path)));
}
