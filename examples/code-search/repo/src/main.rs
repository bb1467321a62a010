fn main() {
    let retries = 3; // TODO: read from config
    println!("{}", retries);
}
