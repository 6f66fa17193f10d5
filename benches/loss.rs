//! `cargo bench [-- --quick | --shapes BxDxC,... | --reps N | --json FILE | --adapter NAME]`:
//! the portable benchmark of `margin_softmax::bench`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(message) = margin_softmax::bench::main_with_args(&args) {
        eprintln!("{message}");
        std::process::exit(2);
    }
}
