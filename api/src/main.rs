fn main() { ltv_containers::process::init_main() }
