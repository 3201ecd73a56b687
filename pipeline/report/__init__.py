"""What a run reports: MLflow tracking (written from one place), run readers, loss-curve math and plots."""
