"""vLLM integration: KV-event wire decoding (wire) and load scraping (metrics_scrape)."""
