//! Stand-alone VMM for tests and benchmarks: `ltv-vmm --config FILE` (same as `ltv vmm`).
//! `ltv-vmm --print-cmdline ARGS` prints the kernel command line it would boot with on this
//! host (defaults and, on kvm-pvm, the compat switches added), so that a benchmark can give
//! another VMM the same one.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = match args.as_slice() {
        [_, flag, path] if flag == "--config" => path.clone(),
        [_, flag, user] if flag == "--print-cmdline" => {
            let flavour = ltv_vmm::kvm_flavour();
            println!("{}", ltv_vmm::builder::assemble_cmdline(user, &[], flavour));
            return;
        }
        _ => {
            eprintln!("usage: ltv-vmm --config FILE | --print-cmdline ARGS");
            std::process::exit(ltv_vmm::EXIT_BAD_CONFIG);
        }
    };
    std::process::exit(ltv_vmm::vmm_main(std::path::Path::new(&path)));
}
