"""re2tal.raydata: Ray Data pipelines over re2tal.data (the prepare job, the ray_data loader)."""
