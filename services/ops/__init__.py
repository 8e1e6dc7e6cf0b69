"""Operations: `qrec up` runs a whole deployment on one machine, `qrec status` reports on it."""
