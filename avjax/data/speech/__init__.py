"""Speech: audio -> log-mel and learned features, k-means units and their tokenizer, the unit
vocoder, corpora (embedded stories read by espeak-ng, user folders, TFDS), tokenised token
stores, LM windows, and the data module of spoken LMs (`speech_lm.SpeechLMData`)."""
