//! A greeter server on its own: `cargo run -p greeter --bin server -- 127.0.0.1:50051`.

use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("greeter serving on {}", listener.local_addr()?);
    greeter::serve(listener, addr).await?;
    Ok(())
}
