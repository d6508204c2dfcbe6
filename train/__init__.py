"""The programs that make data, train and evaluate: phoenix-synth, -prepare, -train, -eval, -demo."""
