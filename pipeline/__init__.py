"""imagebatch's domain: specs, caps, planning, budget and ledger, upstream, storage, models."""
