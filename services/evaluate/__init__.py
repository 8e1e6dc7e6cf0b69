"""`qrec evaluate`: offline ranking evaluation on recorded logs and off-policy estimates."""
