pub async fn run(_orders: u32) -> anyhow::Result<()> {
    Ok(())
}
