-- Orthanc as the hospital PACS: forward every instance it receives to dicomnode, except what
-- dicomnode itself sent back (its SEG, SR and SC results), so nothing loops.
-- The modality "dicomnode" is declared in Orthanc's configuration (DicomModalities).

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin["RemoteAet"] == "DICOMNODE" then
    return
  end
  local modality = tags["Modality"] or ""
  if modality == "SEG" or modality == "SR" then
    return
  end
  SendToModality(instanceId, "dicomnode")
end
